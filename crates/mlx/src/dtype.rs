use crate::{Error, Result};

/// An MLX element type. The discriminants match the shim's `MLXS_*` codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Dtype {
    Bool = 0,
    Uint8 = 1,
    Uint16 = 2,
    Uint32 = 3,
    Uint64 = 4,
    Int8 = 5,
    Int16 = 6,
    Int32 = 7,
    Int64 = 8,
    Float16 = 9,
    Float32 = 10,
    Float64 = 11,
    Bfloat16 = 12,
    Complex64 = 13,
}

impl Dtype {
    pub(crate) fn from_code(code: i32) -> Result<Dtype> {
        use Dtype::*;
        Ok(match code {
            0 => Bool,
            1 => Uint8,
            2 => Uint16,
            3 => Uint32,
            4 => Uint64,
            5 => Int8,
            6 => Int16,
            7 => Int32,
            8 => Int64,
            9 => Float16,
            10 => Float32,
            11 => Float64,
            12 => Bfloat16,
            13 => Complex64,
            other => return Err(Error::Invalid(format!("unknown MLX dtype code {other}"))),
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            Bool | Uint8 | Int8 => 1,
            Uint16 | Int16 | Float16 | Bfloat16 => 2,
            Uint32 | Int32 | Float32 => 4,
            Uint64 | Int64 | Float64 | Complex64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::Float16 | Dtype::Float32 | Dtype::Float64 | Dtype::Bfloat16)
    }

    /// Parses the names used in config files and safetensors headers ("bfloat16", "F16", ...).
    pub fn parse(name: &str) -> Option<Dtype> {
        Some(match name.to_ascii_lowercase().as_str() {
            "float32" | "f32" => Dtype::Float32,
            "float16" | "f16" | "half" => Dtype::Float16,
            "bfloat16" | "bf16" => Dtype::Bfloat16,
            "float64" | "f64" => Dtype::Float64,
            "int32" | "i32" => Dtype::Int32,
            "uint32" | "u32" => Dtype::Uint32,
            "int64" | "i64" => Dtype::Int64,
            "uint8" | "u8" => Dtype::Uint8,
            "bool" => Dtype::Bool,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = format!("{self:?}").to_ascii_lowercase();
        f.write_str(&s)
    }
}
