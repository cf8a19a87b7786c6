//! Helpers shared by the engine's integration tests: fixture paths, golden files, scratch copies.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

#[derive(Deserialize)]
pub struct Golden {
    pub model: String,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt: String,
    #[serde(default)]
    pub messages: Option<Vec<mlx_serving_engine::ChatMessage>>,
    pub prompt_ids: Vec<u32>,
    pub first_step_logprobs: Vec<f32>,
    pub greedy_tokens: Vec<u32>,
}

/// Every golden file, sorted by model name.
pub fn goldens() -> Vec<Golden> {
    let dir = fixtures().join("golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    files
        .iter()
        .map(|f| {
            serde_json::from_str(&std::fs::read_to_string(f).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        })
        .collect()
}

/// A scratch copy of a fixture model directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn copy_of(model: &str, tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mlx-serving-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(model_dir(model)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
