//! Input front ends: global CMVN, convolutional subsampling, sinusoidal position
//! encodings.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// `[1, len, d]` sinusoid: even dims `sin(pos * w)`, odd dims `cos(pos * w)`,
/// `w = 10000^(-2i/d)`, positions `offset..offset + len`.
pub fn sinusoid(offset: i64, len: i64, d: i64, device: Device) -> Tensor {
    let pos = Tensor::arange_start(offset, offset + len, (Kind::Float, device)).unsqueeze(1);
    let div = (Tensor::arange_start_step(0, d, 2, (Kind::Float, device))
        * -(10000f64.ln() / d as f64))
        .exp();
    let angles = pos * div.unsqueeze(0); // [len, d/2]
    Tensor::stack(&[angles.sin(), angles.cos()], 2).view([1, len, d])
}

/// Global CMVN as WeNet's `GlobalCMVN`: `(x - mean) * istd`, buffers `mean`, `istd`.
#[derive(Debug)]
pub struct GlobalCmvn {
    mean: Tensor,
    istd: Tensor,
}

impl GlobalCmvn {
    /// Non-trainable buffers of width `dim` (zeros / ones until loaded).
    pub fn new(path: &nn::Path<'_>, dim: i64) -> Self {
        Self {
            mean: path.zeros_no_train("mean", &[dim]),
            istd: path.ones_no_train("istd", &[dim]),
        }
    }

    /// Sets the statistics (from a `global_cmvn` file's mean and inverse std).
    pub fn set(&mut self, mean: &[f32], istd: &[f32]) {
        tch::no_grad(|| {
            self.mean
                .copy_(&Tensor::from_slice(mean).to_device(self.mean.device()));
            self.istd
                .copy_(&Tensor::from_slice(istd).to_device(self.istd.device()));
        });
    }

    /// Normalises `[B, T, dim]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        (x - &self.mean) * &self.istd
    }
}

/// Convolutional subsampling by 4, 6 or 8 (WeNet's `Conv2dSubsampling4/6/8`):
/// stride-2 (and stride-3) 3x3 / 5x5 convolutions with ReLU, then a linear projection;
/// parameters `conv.{0,2,4}` and `out.0`.
#[derive(Debug)]
pub struct Conv2dSubsampling {
    convs: Vec<nn::Conv2D>,
    out: nn::Linear,
    rate: i64,
    /// Frames of context the stack consumes beyond one output frame.
    right_context: i64,
    d: i64,
}

impl Conv2dSubsampling {
    /// `idim` input features to width `d` at `rate` (4, 6 or 8).
    pub fn new(path: &nn::Path<'_>, idim: i64, d: i64, rate: i64) -> Self {
        let conv = path / "conv";
        let c = |i: i64, cin: i64, k: i64, s: i64| crate::init::conv2d(&conv / i, cin, d, k, s);
        let (convs, freq, right_context) = match rate {
            6 => (
                vec![c(0, 1, 3, 2), c(2, d, 5, 3)],
                ((idim - 1) / 2 - 2) / 3,
                10,
            ),
            8 => (
                vec![c(0, 1, 3, 2), c(2, d, 3, 2), c(4, d, 3, 2)],
                (((idim - 1) / 2 - 1) / 2 - 1) / 2,
                14,
            ),
            _ => (
                vec![c(0, 1, 3, 2), c(2, d, 3, 2)],
                ((idim - 1) / 2 - 1) / 2,
                6,
            ),
        };
        // WeNet names the projection `out.0` for x4 and `linear` for x6 and x8.
        let out_path = if rate == 4 {
            path / "out" / 0
        } else {
            path / "linear"
        };
        Self {
            convs,
            out: crate::init::linear(out_path, d * freq, d, true),
            rate,
            right_context,
            d,
        }
    }

    /// Subsampling rate.
    pub fn rate(&self) -> i64 {
        self.rate
    }

    /// Input frames that one output frame needs beyond the first (its receptive field).
    pub fn right_context(&self) -> i64 {
        self.right_context
    }

    /// `[B, T, idim]` and mask `[B, 1, T]` to `[B, T', d]` and mask `[B, 1, T']`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        let _t = crate::profile::span("subsampling");
        let mut h = x.unsqueeze(1);
        for conv in &self.convs {
            h = conv.forward(&h).relu();
        }
        let (b, c, t, f) = h.size4().expect("4-d conv output");
        let h = self
            .out
            .forward(&h.transpose(1, 2).contiguous().view([b, t, c * f]));
        // WeNet's mask subsampling: [2::2] per stride-2 conv, [4::3] for the stride-3 one.
        let step = |m: Tensor, start: i64, stride: i64| m.slice(2, start, None, stride);
        let m = match self.rate {
            6 => step(step(mask.shallow_clone(), 2, 2), 4, 3),
            8 => step(step(step(mask.shallow_clone(), 2, 2), 2, 2), 2, 2),
            _ => step(step(mask.shallow_clone(), 2, 2), 2, 2),
        };
        debug_assert_eq!(h.size()[2], self.d);
        (h, m)
    }
}
