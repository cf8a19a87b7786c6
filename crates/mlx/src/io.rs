//! Reading and writing safetensors files.
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::Path;

use crate::array::wrap;
use crate::error::{last, status};
use crate::{Array, Error, Result, ffi};

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} has a NUL byte", path.display())))
}

/// The tensors of one safetensors file, by name, and the file's metadata.
pub struct Safetensors {
    pub tensors: Vec<(String, Array)>,
    pub metadata: HashMap<String, String>,
}

/// Loads a safetensors file. A missing, truncated or malformed file is an error naming the problem.
pub fn load_safetensors(path: &Path) -> Result<Safetensors> {
    let c = c_path(path)?;
    // SAFETY: `c` outlives the call.
    let st = unsafe { ffi::mlxs_load_safetensors(c.as_ptr()) };
    if st.is_null() {
        let Error::Mlx(msg) = last() else { unreachable!("last() is always Error::Mlx") };
        return Err(Error::Mlx(format!("{}: {msg}", path.display())));
    }
    let mut tensors = Vec::new();
    let mut metadata = HashMap::new();
    // SAFETY: `st` is valid until freed below; names are copied before that.
    let result = (|| unsafe {
        for i in 0..ffi::mlxs_safetensors_len(st) {
            let name = CStr::from_ptr(ffi::mlxs_safetensors_name(st, i)).to_string_lossy().into_owned();
            tensors.push((name, wrap(ffi::mlxs_safetensors_array(st, i))?));
        }
        let v = ffi::mlxs_safetensors_metadata(st, c"format".as_ptr());
        if !v.is_null() {
            metadata.insert("format".to_string(), CStr::from_ptr(v).to_string_lossy().into_owned());
        }
        Ok(())
    })();
    // SAFETY: freed exactly once; the arrays hold their own references.
    unsafe { ffi::mlxs_safetensors_free(st) };
    result.map(|()| Safetensors { tensors, metadata })
}

/// Writes arrays to a safetensors file.
pub fn save_safetensors(path: &Path, tensors: &[(&str, &Array)]) -> Result<()> {
    let c = c_path(path)?;
    let names: Vec<CString> = tensors
        .iter()
        .map(|(n, _)| CString::new(*n).map_err(|_| Error::Invalid(format!("tensor name {n:?} has a NUL byte"))))
        .collect::<Result<_>>()?;
    let name_ptrs: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let arrays: Vec<ffi::Arr> = tensors.iter().map(|(_, a)| a.raw() as ffi::Arr).collect();
    // SAFETY: all pointers stay valid for the call.
    status(unsafe { ffi::mlxs_save_safetensors(c.as_ptr(), name_ptrs.as_ptr(), arrays.as_ptr(), arrays.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_truncation() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mlx-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Invalid(e.to_string()))?;
        let path = dir.join("t.safetensors");
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
        save_safetensors(&path, &[("w", &a)])?;
        let st = load_safetensors(&path)?;
        assert_eq!(st.tensors.len(), 1);
        assert_eq!(st.tensors[0].0, "w");
        assert_eq!(st.tensors[0].1.to_vec::<f32>()?, a.to_vec::<f32>()?);

        let bytes = std::fs::read(&path).map_err(|e| Error::Invalid(e.to_string()))?;
        let cut = dir.join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 8]).map_err(|e| Error::Invalid(e.to_string()))?;
        // A truncated file fails either on load or on first read, never with an abort.
        let outcome = load_safetensors(&cut).and_then(|st| st.tensors[0].1.to_vec::<f32>().map(|_| ()));
        assert!(outcome.is_err(), "a truncated file must not load");
        assert!(load_safetensors(&dir.join("missing.safetensors")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
