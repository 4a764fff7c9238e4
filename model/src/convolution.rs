//! The Conformer convolution module: pointwise conv + GLU, depthwise conv (causal or
//! centred), layer norm, activation, pointwise conv; padded frames zeroed.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::activation::Activation;
use crate::init;

/// WeNet's `ConvolutionModule` with `cnn_module_norm: layer_norm` (parameters
/// `pointwise_conv1`, `depthwise_conv`, `norm`, `pointwise_conv2`).
#[derive(Debug)]
pub struct ConvolutionModule {
    pointwise_conv1: nn::Conv1D,
    depthwise_conv: nn::Conv1D,
    norm: nn::LayerNorm,
    pointwise_conv2: nn::Conv1D,
    activation: Activation,
    /// Left padding of a causal convolution (0 when centred).
    lorder: i64,
}

impl ConvolutionModule {
    /// A module over `channels` with depthwise kernel `kernel`.
    pub fn new(
        path: &nn::Path<'_>,
        channels: i64,
        kernel: i64,
        causal: bool,
        activation: Activation,
    ) -> Self {
        let (padding, lorder) = if causal {
            (0, kernel - 1)
        } else {
            ((kernel - 1) / 2, 0)
        };
        Self {
            pointwise_conv1: init::conv1d(
                path / "pointwise_conv1",
                channels,
                2 * channels,
                1,
                0,
                1,
            ),
            depthwise_conv: init::conv1d(
                path / "depthwise_conv",
                channels,
                channels,
                kernel,
                padding,
                channels,
            ),
            norm: nn::layer_norm(path / "norm", vec![channels], Default::default()),
            pointwise_conv2: init::conv1d(path / "pointwise_conv2", channels, channels, 1, 0, 1),
            activation,
            lorder,
        }
    }

    /// `x` `[B, T, C]`, `mask_pad` `[B, 1, T]` (true on real frames).
    pub fn forward(&self, x: &Tensor, mask_pad: &Tensor) -> Tensor {
        let _t = crate::profile::span("convolution");
        let keep = mask_pad.logical_not();
        let mut x = x.transpose(1, 2).masked_fill(&keep, 0.0); // [B, C, T]
        if self.lorder > 0 {
            x = x.constant_pad_nd([self.lorder, 0]);
        }
        let x = self.pointwise_conv1.forward(&x).glu(1);
        let x = self.depthwise_conv.forward(&x);
        let x = self
            .activation
            .apply(&self.norm.forward(&x.transpose(1, 2)))
            .transpose(1, 2);
        let x = self.pointwise_conv2.forward(&x).masked_fill(&keep, 0.0);
        x.transpose(1, 2)
    }
}
