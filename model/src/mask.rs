//! Masks, as WeNet builds them (`true` marks a position that may be attended to), and
//! computing on the unmasked positions only.

use tch::{Device, Kind, Tensor};

/// `[B, T]`: true at frames beyond each length (padding).
pub fn make_pad_mask(lengths: &Tensor, max_len: i64) -> Tensor {
    let range = Tensor::arange(max_len, (Kind::Int64, lengths.device())).unsqueeze(0);
    range.ge_tensor(&lengths.unsqueeze(1))
}

/// `[L, L]` lower-triangular: position i sees positions 0..=i.
pub fn subsequent_mask(size: i64, device: Device) -> Tensor {
    Tensor::ones([size, size], (Kind::Bool, device)).tril(0)
}

/// `[size, size]`: position i sees its own chunk and everything before it, or only
/// `num_left_chunks` chunks before it when that is not negative (WeNet's
/// `subsequent_chunk_mask`).
pub fn subsequent_chunk_mask(
    size: i64,
    chunk_size: i64,
    num_left_chunks: i64,
    device: Device,
) -> Tensor {
    let pos = Tensor::arange(size, (Kind::Int64, device));
    let chunk = pos.divide_scalar_mode(chunk_size, "floor");
    let ending = ((&chunk + 1) * chunk_size).clamp_max(size).unsqueeze(1);
    let start = if num_left_chunks >= 0 {
        ((&chunk - num_left_chunks) * chunk_size)
            .clamp_min(0)
            .unsqueeze(1)
    } else {
        Tensor::zeros([size, 1], (Kind::Int64, device))
    };
    let cols = pos.unsqueeze(0);
    cols.ge_tensor(&start).logical_and(&cols.lt_tensor(&ending))
}

/// Which context the encoder's self-attention sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkMode {
    /// Every frame sees every frame.
    Full,
    /// Chunks of `size` frames (after subsampling), with `left_chunks` chunks of left
    /// context (negative: all).
    Chunk {
        /// Frames per chunk after subsampling.
        size: i64,
        /// Left chunks visible; negative means all.
        left_chunks: i64,
    },
    /// U2++ dynamic chunk training: the chunk is drawn from the two random numbers
    /// (the caller's RNG, so runs are reproducible) by WeNet's rule once the
    /// subsampled length is known.
    Dynamic {
        /// Draw for the chunk size.
        draw: u64,
        /// Draw for the left context (used with `use_dynamic_left_chunk`).
        left_draw: u64,
        /// Whether to draw a limited left context.
        dynamic_left: bool,
        /// Largest drawn chunk: WeNet uses `100 / subsampling rate` (25 for x4).
        max_chunk: i64,
    },
}

impl ChunkMode {
    /// WeNet's dynamic rule for a subsampled length `max_len`: chunk uniform in
    /// `1..max_len`; above `max_len / 2` full context, else `chunk % max_chunk + 1`.
    pub fn resolve(self, max_len: i64) -> ChunkMode {
        match self {
            ChunkMode::Dynamic {
                draw,
                left_draw,
                dynamic_left,
                max_chunk,
            } => {
                if max_len <= 1 {
                    return ChunkMode::Full;
                }
                let chunk = 1 + (draw % (max_len as u64 - 1)) as i64;
                if chunk > max_len / 2 {
                    return ChunkMode::Full;
                }
                let size = chunk % max_chunk.max(1) + 1;
                let left_chunks = if dynamic_left {
                    let max_left = (max_len - 1) / size;
                    if max_left > 0 {
                        (left_draw % max_left as u64) as i64
                    } else {
                        0
                    }
                } else {
                    -1
                };
                ChunkMode::Chunk { size, left_chunks }
            }
            other => other,
        }
    }
}

/// The attention mask `[B, T, T]` (or `[B, 1, T]` for full context) for padding mask
/// `masks` `[B, 1, T]`: WeNet's `add_optional_chunk_mask`, including its rule that a
/// row with nothing visible is made all-visible (its output is masked later) so that
/// no NaN appears.
pub fn chunk_attention_mask(masks: &Tensor, mode: ChunkMode) -> Tensor {
    let t = masks.size()[2];
    match mode.resolve(t) {
        ChunkMode::Full => masks.shallow_clone(),
        ChunkMode::Chunk { size, left_chunks } => {
            let chunk =
                subsequent_chunk_mask(t, size.max(1), left_chunks, masks.device()).unsqueeze(0);
            let m = masks.logical_and(&chunk);
            let empty = m.any_dim(-1, true).logical_not();
            m.logical_or(&empty)
        }
        ChunkMode::Dynamic { .. } => unreachable!("resolved above"),
    }
}

/// `f` applied to the rows of `x` `[B, T, d]` where `valid` `[B, T]` is true, as `[N, d]`;
/// padding positions get zeros (every later layer masks them: attention's keys, the
/// convolution's inputs, the losses). Without `valid`, `f` sees every position.
pub fn on_valid_rows(
    x: &Tensor,
    valid: Option<&Tensor>,
    f: impl FnOnce(&Tensor) -> Tensor,
) -> Tensor {
    let size = x.size();
    let flat = x.reshape([-1, size[size.len() - 1]]);
    let out = match valid {
        None => f(&flat),
        Some(valid) => {
            let index = valid.reshape([-1]).nonzero().squeeze_dim(1);
            let rows = f(&flat.index_select(0, &index));
            rows.new_zeros(flat.size(), (rows.kind(), rows.device()))
                .index_copy(0, &index, &rows)
        }
    };
    out.view(size.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(t: &Tensor) -> Vec<Vec<bool>> {
        let n = t.size()[0];
        (0..n)
            .map(|i| Vec::<bool>::try_from(t.get(i)).unwrap())
            .collect()
    }

    #[test]
    fn chunk_mask_matches_wenet() {
        let _rng = crate::test_rng::lock();
        // WeNet's docstring example: size 4, chunk 2.
        let m = rows(&subsequent_chunk_mask(4, 2, -1, Device::Cpu));
        assert_eq!(
            m,
            vec![
                vec![true, true, false, false],
                vec![true, true, false, false],
                vec![true, true, true, true],
                vec![true, true, true, true]
            ]
        );
        // One left chunk: position 4 (chunk 2) sees chunks 1 and 2.
        let m = rows(&subsequent_chunk_mask(6, 2, 1, Device::Cpu));
        assert_eq!(m[4], vec![false, false, true, true, true, true]);
        assert_eq!(m[1], vec![true, true, false, false, false, false]);
    }

    #[test]
    fn pad_mask_and_dynamic_rule() {
        let _rng = crate::test_rng::lock();
        let m = make_pad_mask(&Tensor::from_slice(&[2i64, 4]), 4);
        assert_eq!(
            Vec::<bool>::try_from(m.get(0)).unwrap(),
            vec![false, false, true, true]
        );
        let dyn_ = |draw| {
            ChunkMode::Dynamic {
                draw,
                left_draw: 0,
                dynamic_left: false,
                max_chunk: 25,
            }
            .resolve(100)
        };
        // draw 60 -> chunk 61 > 50 -> full; draw 29 -> chunk 30 -> 30 % 25 + 1 = 6.
        assert_eq!(dyn_(60), ChunkMode::Full);
        assert_eq!(
            dyn_(29),
            ChunkMode::Chunk {
                size: 6,
                left_chunks: -1
            }
        );
    }

    #[test]
    fn rows_with_nothing_visible_become_all_visible() {
        let _rng = crate::test_rng::lock();
        // Length 2 of 6, one left chunk of size 2: rows 4 and 5 would see only padding.
        let masks = make_pad_mask(&Tensor::from_slice(&[2i64]), 6)
            .logical_not()
            .unsqueeze(1);
        let m = chunk_attention_mask(
            &masks,
            ChunkMode::Chunk {
                size: 2,
                left_chunks: 1,
            },
        );
        assert_eq!(
            Vec::<bool>::try_from(m.get(0).get(5)).unwrap(),
            vec![true; 6]
        );
        assert_eq!(
            Vec::<bool>::try_from(m.get(0).get(1)).unwrap(),
            vec![true, true, false, false, false, false]
        );
    }
}
