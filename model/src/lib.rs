//! `upcycle-model`: the Conformer U2++ recognizer and its Mixture-of-Experts layers.
//!
//! It will own the encoder, the MoE feed-forward (router, dispatch, stacked experts),
//! the bidirectional attention decoder, CTC, masks, decoding and the upcycling of dense
//! weights (see `../shared/design/ARCHITECTURE.md`). It knows nothing about files,
//! configs on disk or processes. Empty until the dense-model issue lands.
