//! Layers initialised as PyTorch initialises them (WeNet relies on these defaults):
//! weights and biases uniform in `±1/sqrt(fan_in)`. tch's own defaults differ (Kaiming
//! with a ReLU gain, about 2.4x wider, and zero conv biases), which leaves a Conformer
//! stuck on CTC's all-blank plateau, so every layer of the model is built here.

use tch::nn::{self, Init};

fn uniform(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `torch.nn.Linear(input, output, bias)`.
pub fn linear(path: nn::Path<'_>, input: i64, output: i64, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: uniform(input),
        bs_init: bias.then(|| uniform(input)),
        bias,
    };
    nn::linear(path, input, output, cfg)
}

/// `torch.nn.Conv1d(input, output, kernel, padding=padding, groups=groups)`.
pub fn conv1d(
    path: nn::Path<'_>,
    input: i64,
    output: i64,
    kernel: i64,
    padding: i64,
    groups: i64,
) -> nn::Conv1D {
    let fan_in = input / groups * kernel;
    let cfg = nn::ConvConfig {
        padding,
        groups,
        ws_init: uniform(fan_in),
        bs_init: uniform(fan_in),
        ..Default::default()
    };
    nn::conv1d(path, input, output, kernel, cfg)
}

/// `torch.nn.Conv2d(input, output, kernel, stride)`.
pub fn conv2d(path: nn::Path<'_>, input: i64, output: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    let fan_in = input * kernel * kernel;
    let cfg = nn::ConvConfig {
        stride,
        ws_init: uniform(fan_in),
        bs_init: uniform(fan_in),
        ..Default::default()
    };
    nn::conv2d(path, input, output, kernel, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn bounds_are_pytorchs() {
        let _rng = crate::test_rng::lock();
        let vs = nn::VarStore::new(Device::Cpu);
        let l = linear(vs.root() / "l", 400, 10, true);
        let max = l.ws.abs().max().double_value(&[]);
        assert!(max <= 0.05 + 1e-7 && max > 0.04, "{max}");
        let b = l.bs.as_ref().unwrap().abs().max().double_value(&[]);
        assert!(b <= 0.05 + 1e-7 && b > 0.0);
        let c = conv1d(vs.root() / "c", 16, 16, 15, 7, 16);
        let max = c.ws.abs().max().double_value(&[]);
        assert!(max <= 1.0 / 15f64.sqrt() + 1e-7);
    }
}
