//! The tensors of a model directory (`*.safetensors`), taken one by one by the layers.
use std::collections::HashMap;
use std::path::Path;

use mlx::Array;

use crate::error::{EngineError, Result};

pub struct Weights {
    tensors: HashMap<String, Array>,
}

impl Weights {
    /// Loads every `*.safetensors` file in `dir`.
    pub fn load(dir: &Path) -> Result<Weights> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| EngineError::bad_file(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::bad_file(dir, "no *.safetensors files"));
        }
        let mut tensors = HashMap::new();
        for file in &files {
            let st = mlx::io::load_safetensors(file).map_err(|e| EngineError::bad_file(file, e))?;
            tensors.extend(st.tensors);
        }
        Ok(Weights { tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes a tensor out; a missing one is an error naming it.
    pub fn take(&mut self, name: &str) -> Result<Array> {
        self.tensors.remove(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))
    }

    /// Takes a tensor and checks its shape.
    pub fn take_shaped(&mut self, name: &str, expected: &[i32]) -> Result<Array> {
        let a = self.take(name)?;
        let got = a.shape();
        if got != expected {
            return Err(EngineError::ShapeMismatch { name: name.to_string(), expected: expected.to_vec(), got });
        }
        Ok(a)
    }

    /// Takes a tensor if present.
    pub fn take_optional(&mut self, name: &str) -> Option<Array> {
        self.tensors.remove(name)
    }

    /// Names not taken by any layer (weights the architecture does not use).
    pub fn remaining(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// Every array still held, for evaluation.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.tensors.values()
    }
}
