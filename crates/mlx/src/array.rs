use std::ptr::NonNull;

use crate::error::{last, status};
use crate::{Dtype, Error, Result, ffi};

/// A lazily evaluated MLX array: one reference to MLX's own reference-counted array.
pub struct Array {
    ptr: NonNull<ffi::mlxs_array>,
}

// SAFETY: MLX arrays are reference counted with atomic counts, so a handle may move to another
// thread. Building and evaluating graphs should stay on one thread per program (see the crate docs).
unsafe impl Send for Array {}

impl Drop for Array {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the shim and is dropped exactly once.
        unsafe { ffi::mlxs_array_free(self.ptr.as_ptr()) }
    }
}

impl Clone for Array {
    /// Takes another reference to the same array (no data is copied).
    fn clone(&self) -> Self {
        // SAFETY: the handle is valid; the shim only copies a shared pointer.
        let p = unsafe { ffi::mlxs_array_clone(self.raw()) };
        match NonNull::new(p) {
            Some(ptr) => Array { ptr },
            None => std::process::abort(), // only an allocation of a few bytes can fail here
        }
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Array(shape={:?}, dtype={})", self.shape(), self.dtype())
    }
}

/// Rust element types that can be copied into and out of arrays.
pub trait Element: Copy + Default + 'static {
    const DTYPE: Dtype;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: Dtype = $d;
        }
    };
}
element!(f32, Dtype::Float32);
element!(f64, Dtype::Float64);
element!(i32, Dtype::Int32);
element!(u32, Dtype::Uint32);
element!(i64, Dtype::Int64);
element!(u64, Dtype::Uint64);
element!(u8, Dtype::Uint8);
element!(bool, Dtype::Bool);

pub(crate) fn wrap(p: ffi::Arr) -> Result<Array> {
    NonNull::new(p).map(|ptr| Array { ptr }).ok_or_else(last)
}

fn ndim_i32(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Invalid(format!("too many dimensions: {n}")))
}

fn raws(arrays: &[&Array]) -> Vec<ffi::Arr> {
    arrays.iter().map(|a| a.ptr.as_ptr()).collect()
}

/// Computes the given arrays (and what they depend on), blocking until done.
pub fn eval(arrays: &[&Array]) -> Result<()> {
    let v = raws(arrays);
    // SAFETY: every pointer is a live handle borrowed for the call.
    status(unsafe { ffi::mlxs_eval(v.as_ptr(), v.len()) })
}

/// The operations not yet evaluated behind `arrays`, counted by primitive (`Add`, `Matmul`,
/// `Compiled`, ...), sorted by name: what one step will launch. A diagnostic.
pub fn graph_ops(arrays: &[&Array]) -> Result<Vec<(String, usize)>> {
    let v = raws(arrays);
    // SAFETY: as in eval; the returned string lives until the next call on this thread and is
    // copied at once.
    let text = unsafe { ffi::mlxs_graph_ops(v.as_ptr(), v.len()) };
    if text.is_null() {
        return Err(last());
    }
    // SAFETY: a NUL-terminated string from the shim.
    let text = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned();
    Ok(text
        .lines()
        .filter_map(|l| l.rsplit_once(' ').and_then(|(name, n)| Some((name.to_string(), n.parse().ok()?))))
        .collect())
}

/// How many operations not yet evaluated lie behind `arrays`: [`graph_ops`] summed.
pub fn graph_op_count(arrays: &[&Array]) -> Result<usize> {
    Ok(graph_ops(arrays)?.iter().map(|(_, n)| n).sum())
}

/// Starts computing the given arrays and returns at once; a later [`eval`] or read waits for them.
pub fn async_eval(arrays: &[&Array]) -> Result<()> {
    let v = raws(arrays);
    // SAFETY: as in eval.
    status(unsafe { ffi::mlxs_async_eval(v.as_ptr(), v.len()) })
}

/// Joins arrays along `axis`.
pub fn concatenate(arrays: &[&Array], axis: i32) -> Result<Array> {
    let v = raws(arrays);
    // SAFETY: as in eval.
    wrap(unsafe { ffi::mlxs_concatenate(v.as_ptr(), v.len(), axis) })
}

/// Element-wise `cond ? x : y`, with broadcasting.
pub fn where_cond(cond: &Array, x: &Array, y: &Array) -> Result<Array> {
    // SAFETY: live handles.
    wrap(unsafe { ffi::mlxs_where(cond.raw(), x.raw(), y.raw()) })
}

macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident => $op:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self) -> Result<Array> {
            // SAFETY: live handle.
            wrap(unsafe { ffi::mlxs_unary(ffi::$op, self.raw()) })
        }
    )*};
}

macro_rules! binary {
    ($($(#[$doc:meta])* $name:ident => $op:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self, other: &Array) -> Result<Array> {
            // SAFETY: live handles.
            wrap(unsafe { ffi::mlxs_binary(ffi::$op, self.raw(), other.raw()) })
        }
    )*};
}

macro_rules! reduce {
    ($($(#[$doc:meta])* $name:ident => $op:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self, axis: i32, keepdims: bool) -> Result<Array> {
            // SAFETY: live handle.
            wrap(unsafe { ffi::mlxs_reduce(ffi::$op, self.raw(), axis, keepdims as i32) })
        }
    )*};
}

impl Array {
    pub(crate) fn raw(&self) -> ffi::CArr {
        self.ptr.as_ptr()
    }

    /// An array holding a copy of `data` with the given shape.
    pub fn from_slice<T: Element>(data: &[T], shape: &[i32]) -> Result<Array> {
        let n: i64 = shape.iter().map(|&d| i64::from(d)).product();
        if shape.iter().any(|&d| d < 0) || n != data.len() as i64 {
            return Err(Error::Invalid(format!("shape {shape:?} does not hold {} elements", data.len())));
        }
        // SAFETY: `data` holds exactly `n` elements of T's dtype; the shim copies them.
        wrap(unsafe {
            ffi::mlxs_from_data(data.as_ptr().cast(), shape.as_ptr(), ndim_i32(shape.len())?, T::DTYPE as i32)
        })
    }

    /// A 0-dimensional array of `dtype` holding `value`.
    pub fn scalar(value: f64, dtype: Dtype) -> Result<Array> {
        // SAFETY: plain constructor.
        wrap(unsafe { ffi::mlxs_scalar_f64(value, dtype as i32) })
    }

    /// `[start, start + step, ...)` up to `stop`.
    pub fn arange(start: f64, stop: f64, step: f64, dtype: Dtype) -> Result<Array> {
        // SAFETY: plain constructor.
        wrap(unsafe { ffi::mlxs_arange(start, stop, step, dtype as i32) })
    }

    pub fn zeros(shape: &[i32], dtype: Dtype) -> Result<Array> {
        // SAFETY: the shape slice is valid for the call.
        wrap(unsafe { ffi::mlxs_zeros(shape.as_ptr(), ndim_i32(shape.len())?, dtype as i32) })
    }

    pub fn ndim(&self) -> usize {
        // SAFETY: live handle.
        unsafe { ffi::mlxs_array_ndim(self.raw()) as usize }
    }

    pub fn shape(&self) -> Vec<i32> {
        let mut out = vec![0i32; self.ndim()];
        // SAFETY: `out` has room for ndim entries.
        unsafe { ffi::mlxs_array_shape(self.raw(), out.as_mut_ptr(), out.len() as i32) };
        out
    }

    /// The size of dimension `axis` (negative counts from the end).
    pub fn dim(&self, axis: i32) -> i32 {
        let s = self.shape();
        let i = if axis < 0 { s.len() as i32 + axis } else { axis };
        s.get(i as usize).copied().unwrap_or(0)
    }

    pub fn dtype(&self) -> Dtype {
        // SAFETY: live handle; the shim only returns known codes.
        Dtype::from_code(unsafe { ffi::mlxs_array_dtype(self.raw()) }).unwrap_or(Dtype::Float32)
    }

    /// Number of elements.
    pub fn size(&self) -> usize {
        // SAFETY: live handle.
        unsafe { ffi::mlxs_array_size(self.raw()) }
    }

    pub fn nbytes(&self) -> usize {
        // SAFETY: live handle.
        unsafe { ffi::mlxs_array_nbytes(self.raw()) }
    }

    /// Evaluates the array and copies its elements out, row-major. The array's dtype must be T's.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if self.dtype() != T::DTYPE {
            return Err(Error::Invalid(format!("cannot read a {} array as {}", self.dtype(), T::DTYPE)));
        }
        let mut out = vec![T::default(); self.size()];
        let nbytes = std::mem::size_of_val(out.as_slice());
        // SAFETY: `out` has exactly `nbytes` bytes of T, which matches the array's dtype.
        status(unsafe { ffi::mlxs_read(self.raw(), T::DTYPE as i32, out.as_mut_ptr().cast(), nbytes) })?;
        Ok(out)
    }

    /// The single element of a one-element array.
    pub fn item<T: Element>(&self) -> Result<T> {
        if self.size() != 1 {
            return Err(Error::Invalid(format!("item() on an array of shape {:?}", self.shape())));
        }
        Ok(self.to_vec::<T>()?[0])
    }

    pub fn eval(&self) -> Result<()> {
        eval(&[self])
    }

    unary! {
        exp => EXP;
        log => LOG;
        sigmoid => SIGMOID;
        negative => NEGATIVE;
        sqrt => SQRT;
        rsqrt => RSQRT;
        abs => ABS;
        logical_not => LOGICAL_NOT;
        sin => SIN;
        cos => COS;
        /// `x * sigmoid(x)`.
        silu => SILU;
        isnan => ISNAN;
    }

    binary! {
        add => ADD;
        subtract => SUBTRACT;
        multiply => MULTIPLY;
        divide => DIVIDE;
        maximum => MAXIMUM;
        minimum => MINIMUM;
        greater => GREATER;
        greater_equal => GREATER_EQUAL;
        less => LESS;
        less_equal => LESS_EQUAL;
        equal => EQUAL;
        logical_and => LOGICAL_AND;
        logical_or => LOGICAL_OR;
        power => POWER;
    }

    reduce! {
        sum => SUM;
        max => MAX;
        min => MIN;
        mean => MEAN;
        argmax => ARGMAX;
        argmin => ARGMIN;
        logsumexp => LOGSUMEXP;
    }

    pub fn astype(&self, dtype: Dtype) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_astype(self.raw(), dtype as i32) })
    }

    /// Reshape; one dimension may be -1.
    pub fn reshape(&self, shape: &[i32]) -> Result<Array> {
        // SAFETY: the shape slice is valid for the call.
        wrap(unsafe { ffi::mlxs_reshape(self.raw(), shape.as_ptr(), ndim_i32(shape.len())?) })
    }

    pub fn transpose(&self, axes: &[i32]) -> Result<Array> {
        // SAFETY: the axes slice is valid for the call.
        wrap(unsafe { ffi::mlxs_transpose(self.raw(), axes.as_ptr(), ndim_i32(axes.len())?) })
    }

    /// All axes reversed (NumPy's `.T`).
    pub fn t(&self) -> Result<Array> {
        let axes: Vec<i32> = (0..self.ndim() as i32).rev().collect();
        self.transpose(&axes)
    }

    pub fn expand_dims(&self, axis: i32) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_expand_dims(self.raw(), axis) })
    }

    pub fn squeeze(&self, axis: i32) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_squeeze(self.raw(), axis) })
    }

    pub fn broadcast_to(&self, shape: &[i32]) -> Result<Array> {
        // SAFETY: the shape slice is valid for the call.
        wrap(unsafe { ffi::mlxs_broadcast_to(self.raw(), shape.as_ptr(), ndim_i32(shape.len())?) })
    }

    pub fn contiguous(&self) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_contiguous(self.raw()) })
    }

    /// `a[start[0]:stop[0]:strides[0], ...]` over every dimension.
    pub fn slice(&self, start: &[i32], stop: &[i32], strides: &[i32]) -> Result<Array> {
        let n = self.ndim();
        if start.len() != n || stop.len() != n || strides.len() != n {
            return Err(Error::Invalid(format!("slice of a {n}-d array needs {n} starts, stops and strides")));
        }
        // SAFETY: each slice has ndim entries.
        wrap(unsafe { ffi::mlxs_slice(self.raw(), start.as_ptr(), stop.as_ptr(), strides.as_ptr(), n as i32) })
    }

    /// `a[..., start:stop, ...]` on one axis (negative axis counts from the end).
    pub fn slice_axis(&self, axis: i32, start: i32, stop: i32) -> Result<Array> {
        let shape = self.shape();
        let n = shape.len() as i32;
        let ax = if axis < 0 { n + axis } else { axis };
        if ax < 0 || ax >= n {
            return Err(Error::Invalid(format!("axis {axis} out of range for a {n}-d array")));
        }
        let mut lo = vec![0; shape.len()];
        let mut hi = shape.clone();
        lo[ax as usize] = start;
        hi[ax as usize] = stop;
        self.slice(&lo, &hi, &vec![1; shape.len()])
    }

    /// A copy of `self` with `update` written into the region `start..stop` (unit strides).
    pub fn slice_update(&self, update: &Array, start: &[i32], stop: &[i32]) -> Result<Array> {
        let n = self.ndim();
        if start.len() != n || stop.len() != n {
            return Err(Error::Invalid(format!("slice_update of a {n}-d array needs {n} starts and stops")));
        }
        let strides = vec![1; n];
        // SAFETY: each slice has ndim entries.
        wrap(unsafe {
            ffi::mlxs_slice_update(self.raw(), update.raw(), start.as_ptr(), stop.as_ptr(), strides.as_ptr(), n as i32)
        })
    }

    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array> {
        // SAFETY: live handles.
        wrap(unsafe { ffi::mlxs_take(self.raw(), indices.raw(), axis) })
    }

    pub fn take_along_axis(&self, indices: &Array, axis: i32) -> Result<Array> {
        // SAFETY: live handles.
        wrap(unsafe { ffi::mlxs_take_along_axis(self.raw(), indices.raw(), axis) })
    }

    pub fn put_along_axis(&self, indices: &Array, values: &Array, axis: i32) -> Result<Array> {
        // SAFETY: live handles.
        wrap(unsafe { ffi::mlxs_put_along_axis(self.raw(), indices.raw(), values.raw(), axis) })
    }

    pub fn softmax(&self, axis: i32, precise: bool) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_softmax(self.raw(), axis, precise as i32) })
    }

    pub fn sort(&self, axis: i32) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_sort(self.raw(), axis) })
    }

    pub fn argsort(&self, axis: i32) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_argsort(self.raw(), axis) })
    }

    pub fn argpartition(&self, kth: i32, axis: i32) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_argpartition(self.raw(), kth, axis) })
    }

    pub fn cumsum(&self, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
        // SAFETY: live handle.
        wrap(unsafe { ffi::mlxs_cumsum(self.raw(), axis, reverse as i32, inclusive as i32) })
    }

    pub fn matmul(&self, other: &Array) -> Result<Array> {
        // SAFETY: live handles.
        wrap(unsafe { ffi::mlxs_matmul(self.raw(), other.raw()) })
    }

    /// `beta * self + alpha * (a @ b)`.
    pub fn addmm(&self, a: &Array, b: &Array, alpha: f32, beta: f32) -> Result<Array> {
        // SAFETY: live handles.
        wrap(unsafe { ffi::mlxs_addmm(self.raw(), a.raw(), b.raw(), alpha, beta) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_ops() -> Result<()> {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
        let b = a.matmul(&a.t()?)?;
        assert_eq!(b.shape(), vec![2, 2]);
        assert_eq!(b.to_vec::<f32>()?, vec![5.0, 11.0, 11.0, 25.0]);
        let s = a.sum(-1, false)?;
        assert_eq!(s.to_vec::<f32>()?, vec![3.0, 7.0]);
        assert_eq!(a.argmax(-1, false)?.astype(Dtype::Int32)?.to_vec::<i32>()?, vec![1, 1]);
        assert_eq!(a.slice_axis(1, 1, 2)?.to_vec::<f32>()?, vec![2.0, 4.0]);
        // Views that are not row-contiguous read in their logical order; a contiguous slice
        // reads from its own offset.
        assert_eq!(a.t()?.to_vec::<f32>()?, vec![1.0, 3.0, 2.0, 4.0]);
        assert_eq!(a.slice_axis(0, 1, 2)?.to_vec::<f32>()?, vec![3.0, 4.0]);
        Ok(())
    }

    #[test]
    fn graph_ops_counts_what_is_not_yet_evaluated() -> Result<()> {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
        let b = a.exp()?.add(&a)?;
        let c = b.matmul(&b)?.add(&b)?;
        let ops = graph_ops(&[&c])?;
        assert_eq!(ops, vec![("Add".to_string(), 2), ("Exp".to_string(), 1), ("Matmul".to_string(), 1)]);
        eval(&[&b])?;
        let ops = graph_ops(&[&c])?;
        assert_eq!(ops, vec![("Add".to_string(), 1), ("Matmul".to_string(), 1)], "evaluated arrays are not counted");
        // Two calls of one compiled function are two operations.
        let d = crate::fast::swiglu(&crate::fast::swiglu(&c, &a)?, &a)?;
        let ops = graph_ops(&[&d])?;
        assert_eq!(
            ops.iter().filter(|(name, _)| name.starts_with("Compiled")).map(|(_, n)| n).sum::<usize>(),
            2,
            "{ops:?}"
        );
        Ok(())
    }

    #[test]
    fn errors_are_values() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]).unwrap();
        let b = Array::from_slice(&[1.0f32, 2.0], &[2]).unwrap();
        let err = a.matmul(&b).expect_err("a shape mismatch must fail");
        assert!(matches!(err, Error::Mlx(_)), "{err:?}");
        let err = a.reshape(&[2, 2]).expect_err("bad reshape must fail");
        assert!(err.to_string().contains("reshape") || err.to_string().contains("Cannot"), "{err}");
        assert!(Array::from_slice(&[1.0f32], &[2]).is_err());
        assert!(a.to_vec::<i32>().is_err());
    }
}
