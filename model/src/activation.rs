//! Activation functions by their WeNet config names.

use tch::Tensor;

/// An activation chosen by name in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Swish,
    /// `max(x, 0)`.
    Relu,
    /// Gaussian error linear unit (exact, erf form).
    Gelu,
}

impl Activation {
    /// Parses `swish`, `relu` or `gelu` (configs are validated before this).
    pub fn from_name(name: &str) -> Activation {
        match name {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            _ => Activation::Swish,
        }
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Swish => x.silu(),
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu("none"),
        }
    }
}
