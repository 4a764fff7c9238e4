#!/usr/bin/env python3
"""WeNet's U2++ Conformer ASR model in eager PyTorch: the numerical oracle for upcycle.

This re-states, in one file, the parts of WeNet (https://github.com/wenet-e2e/wenet, 3.x;
Apache-2.0) that a U2++ Conformer train.yaml uses, written the way WeNet writes them and
with exactly WeNet's module tree, so `model.state_dict()` has WeNet's parameter names
(`encoder.encoders.0.self_attn.linear_q.weight`, `decoder.left_decoder.output_layer.bias`,
...) and a WeNet checkpoint loads with `load_state_dict` as is.

Where each piece comes from in WeNet:
  wenet/transformer/cmvn.py                  GlobalCMVN
  wenet/transformer/embedding.py             PositionalEncoding, RelPositionalEncoding
  wenet/transformer/subsampling.py           Conv2dSubsampling4 / 6 / 8
  wenet/transformer/attention.py             MultiHeadedAttention,
                                             RelPositionMultiHeadedAttention (no rel_shift)
  wenet/transformer/positionwise_feed_forward.py  PositionwiseFeedForward, MoEFFNLayer
  wenet/transformer/convolution.py           ConvolutionModule
  wenet/transformer/encoder_layer.py         ConformerEncoderLayer
  wenet/transformer/encoder.py               BaseEncoder.forward, ConformerEncoder
  wenet/transformer/decoder_layer.py         DecoderLayer
  wenet/transformer/decoder.py               TransformerDecoder, BiTransformerDecoder
  wenet/transformer/ctc.py                   CTC
  wenet/transformer/label_smoothing_loss.py  LabelSmoothingLoss
  wenet/transformer/asr_model.py             ASRModel (forward, _calc_att_loss)
  wenet/utils/mask.py                        make_pad_mask, subsequent_mask,
                                             subsequent_chunk_mask, add_optional_chunk_mask
  wenet/utils/common.py                      pad_list, add_sos_eos, reverse_pad_list,
                                             th_accuracy
  wenet/utils/init_model.py                  build_model (here: `build_model`)

Left out, since a U2++ Conformer does not use them: key/value caches and the streaming
`forward_chunk` path, SDPA, rope, RMSNorm, MoE feed-forwards, concat_after, LF-MMI,
context biasing, decoding (beam search) and tied embeddings.

    from u2pp import build_model
    model = build_model(yaml.safe_load(open("configs/tiny.yaml")), vocab_size=30)
    out = model(batch, device)            # {"loss", "loss_att", "loss_ctc", "th_accuracy"}
    full = model.compute(feats, feats_lengths, target, target_lengths,
                         decoding_chunk_size=-1)  # every intermediate the oracle saves
"""
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

IGNORE_ID = -1


# --------------------------------------------------------------------------------------
# wenet/utils/mask.py
# --------------------------------------------------------------------------------------
def make_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """True at padded positions: lengths [5, 3] -> [[0,0,0,0,0],[0,0,0,1,1]]."""
    batch_size = lengths.size(0)
    max_len = max_len if max_len > 0 else int(lengths.max().item())
    seq_range = torch.arange(0, max_len, dtype=torch.int64, device=lengths.device)
    seq_range_expand = seq_range.unsqueeze(0).expand(batch_size, max_len)
    seq_length_expand = lengths.unsqueeze(-1)
    mask = seq_range_expand >= seq_length_expand
    return mask


def subsequent_mask(size: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Lower-triangular (size, size) bool mask, the decoder's causal mask."""
    arange = torch.arange(size, device=device)
    mask = arange.expand(size, size)
    arange = arange.unsqueeze(-1)
    mask = mask <= arange
    return mask


def subsequent_chunk_mask(size: int, chunk_size: int, num_left_chunks: int = -1,
                          device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(size, size) bool mask: row i sees its own chunk, all earlier chunks
    (num_left_chunks < 0) or num_left_chunks earlier chunks."""
    ret = torch.zeros(size, size, device=device, dtype=torch.bool)
    for i in range(size):
        if num_left_chunks < 0:
            start = 0
        else:
            start = max((i // chunk_size - num_left_chunks) * chunk_size, 0)
        ending = min((i // chunk_size + 1) * chunk_size, size)
        ret[i, start:ending] = True
    return ret


def add_optional_chunk_mask(xs: torch.Tensor, masks: torch.Tensor, use_dynamic_chunk: bool,
                            use_dynamic_left_chunk: bool, decoding_chunk_size: int,
                            static_chunk_size: int, num_decoding_left_chunks: int,
                            enable_full_context: bool = True, max_chunk_size: int = 25):
    """The encoder's attention mask (B, L, L) (or the pad mask (B, 1, L) as is).

    decoding_chunk_size: 0 = training (a random dynamic chunk), <0 = full context,
    >0 = that chunk size with num_decoding_left_chunks left chunks (<0: all).
    """
    if use_dynamic_chunk:
        max_len = xs.size(1)
        if decoding_chunk_size < 0:
            chunk_size = max_len
            num_left_chunks = -1
        elif decoding_chunk_size > 0:
            chunk_size = decoding_chunk_size
            num_left_chunks = num_decoding_left_chunks
        else:
            # chunk size is either [1, 25] or full context(max_len).
            # Since we use 4 times subsampling and allow up to 1s(100 frames)
            # delay, the maximum frame is 100 / 4 = 25.
            chunk_size = torch.randint(1, max_len, (1, )).item()
            num_left_chunks = -1
            if chunk_size > max_len // 2 and enable_full_context:
                chunk_size = max_len
            else:
                chunk_size = chunk_size % max_chunk_size + 1
                if use_dynamic_left_chunk:
                    max_left_chunks = (max_len - 1) // chunk_size
                    num_left_chunks = torch.randint(0, max_left_chunks, (1, )).item()
        chunk_masks = subsequent_chunk_mask(xs.size(1), chunk_size, num_left_chunks,
                                            xs.device)  # (L, L)
        chunk_masks = chunk_masks.unsqueeze(0)  # (1, L, L)
        chunk_masks = masks & chunk_masks  # (B, L, L)
    elif static_chunk_size > 0:
        num_left_chunks = num_decoding_left_chunks
        chunk_masks = subsequent_chunk_mask(xs.size(1), static_chunk_size, num_left_chunks,
                                            xs.device)  # (L, L)
        chunk_masks = chunk_masks.unsqueeze(0)  # (1, L, L)
        chunk_masks = masks & chunk_masks  # (B, L, L)
    else:
        chunk_masks = masks
    assert chunk_masks.dtype == torch.bool
    if (chunk_masks.sum(dim=-1) == 0).sum().item() != 0:
        # WeNet prints this; rows that see nothing (padded queries past every visible key)
        # are opened fully so softmax gives no NaN. Their outputs sit at padded frames.
        logging.debug('get chunk_masks all false at some timestep, force set to true, '
                      'make sure they are masked in futuer computation!')
        chunk_masks[chunk_masks.sum(dim=-1) == 0] = True
    return chunk_masks


# --------------------------------------------------------------------------------------
# wenet/utils/common.py
# --------------------------------------------------------------------------------------
def pad_list(xs: List[torch.Tensor], pad_value: int):
    max_len = max([len(item) for item in xs])
    batchs = len(xs)
    pad_res = torch.zeros(batchs, max_len, *(xs[0].shape[1:]), dtype=xs[0].dtype,
                          device=xs[0].device)
    pad_res.fill_(pad_value)
    for i in range(batchs):
        pad_res[i, :len(xs[i])] = xs[i]
    return pad_res


def add_sos_eos(ys_pad: torch.Tensor, sos: int, eos: int,
                ignore_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ys_pad [[1,2,3],[4,-1,-1]] -> ys_in [[sos,1,2,3],[sos,4,eos,eos]],
    ys_out [[1,2,3,eos],[4,eos,-1,-1]]."""
    _sos = torch.tensor([sos], dtype=torch.long, requires_grad=False, device=ys_pad.device)
    _eos = torch.tensor([eos], dtype=torch.long, requires_grad=False, device=ys_pad.device)
    ys = [y[y != ignore_id] for y in ys_pad]  # parse padded ys
    ys_in = [torch.cat([_sos, y], dim=0) for y in ys]
    ys_out = [torch.cat([y, _eos], dim=0) for y in ys]
    return pad_list(ys_in, eos), pad_list(ys_out, ignore_id)


def reverse_pad_list(ys_pad: torch.Tensor, ys_lens: torch.Tensor,
                     pad_value: float = -1.0) -> torch.Tensor:
    """[[1,2,3,4],[5,6,-1,-1]] -> [[4,3,2,1],[6,5,-1,-1]] (as int32, like WeNet)."""
    r_ys_pad = pad_sequence([(torch.flip(y.int()[:i], [0])) for y, i in zip(ys_pad, ys_lens)],
                            True, pad_value)
    return r_ys_pad


def th_accuracy(pad_outputs: torch.Tensor, pad_targets: torch.Tensor,
                ignore_label: int) -> torch.Tensor:
    pad_pred = pad_outputs.view(pad_targets.size(0), pad_targets.size(1),
                                pad_outputs.size(1)).argmax(2)
    mask = pad_targets != ignore_label
    numerator = torch.sum(pad_pred.masked_select(mask) == pad_targets.masked_select(mask))
    denominator = torch.sum(mask)
    return (numerator / denominator).detach()


# --------------------------------------------------------------------------------------
# wenet/transformer/cmvn.py
# --------------------------------------------------------------------------------------
class GlobalCMVN(nn.Module):

    def __init__(self, mean: torch.Tensor, istd: torch.Tensor, norm_var: bool = True):
        super().__init__()
        assert mean.shape == istd.shape
        self.norm_var = norm_var
        self.register_buffer("mean", mean)
        self.register_buffer("istd", istd)

    def forward(self, x: torch.Tensor):
        x = x - self.mean
        if self.norm_var:
            x = x * self.istd
        return x


# --------------------------------------------------------------------------------------
# wenet/transformer/embedding.py
# --------------------------------------------------------------------------------------
class PositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos/(10000^(2i/dmodel))), PE(pos, 2i+1) = cos(...).
    `pe` is a persistent buffer, as in WeNet: every state_dict holds it."""

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000,
                 reverse: bool = False):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(self.d_model)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.max_len = max_len

        pe = torch.zeros(self.max_len, self.d_model)
        position = torch.arange(0, self.max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32) *
            -(math.log(10000.0) / self.d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        self.pe = self.pe.to(x.device)
        pos_emb = self.position_encoding(offset, x.size(1), False)
        x = x * self.xscale + pos_emb
        return self.dropout(x), self.dropout(pos_emb)

    def position_encoding(self, offset: int, size: int, apply_dropout: bool = True):
        assert offset + size <= self.max_len
        pos_emb = self.pe[:, offset:offset + size]
        if apply_dropout:
            pos_emb = self.dropout(pos_emb)
        return pos_emb


class RelPositionalEncoding(PositionalEncoding):
    """x * sqrt(d) and, separately, pe[:, offset:offset+T] for the attention's linear_pos."""

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000):
        super().__init__(d_model, dropout_rate, max_len, reverse=True)

    def forward(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        self.pe = self.pe.to(x.device)
        x = x * self.xscale
        pos_emb = self.position_encoding(offset, x.size(1), False)
        return self.dropout(x), self.dropout(pos_emb)


# --------------------------------------------------------------------------------------
# wenet/transformer/subsampling.py
# --------------------------------------------------------------------------------------
class BaseSubsampling(nn.Module):

    def __init__(self):
        super().__init__()
        self.right_context = 0
        self.subsampling_rate = 1

    def position_encoding(self, offset: int, size: int) -> torch.Tensor:
        return self.pos_enc.position_encoding(offset, size)


class Conv2dSubsampling4(BaseSubsampling):
    """Conv2d(1,d,3,2)+ReLU, Conv2d(d,d,3,2)+ReLU, Linear; time to ~1/4."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: nn.Module):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, odim, 3, 2),
            nn.ReLU(),
            nn.Conv2d(odim, odim, 3, 2),
            nn.ReLU(),
        )
        self.out = nn.Sequential(nn.Linear(odim * (((idim - 1) // 2 - 1) // 2), odim))
        self.pos_enc = pos_enc_class
        # The right context for every conv layer is computed by:
        # (kernel_size - 1) * frame_rate_of_this_layer
        self.subsampling_rate = 4
        # 6 = (3 - 1) * 1 + (3 - 1) * 2
        self.right_context = 6

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: int = 0):
        x = x.unsqueeze(1)  # (b, c=1, t, f)
        x = self.conv(x)
        b, c, t, f = x.size()
        x = self.out(x.transpose(1, 2).contiguous().view(b, t, c * f))
        x, pos_emb = self.pos_enc(x, offset)
        return x, pos_emb, x_mask[:, :, 2::2][:, :, 2::2]


class Conv2dSubsampling6(BaseSubsampling):
    """Conv2d(1,d,3,2)+ReLU, Conv2d(d,d,5,3)+ReLU, Linear (named `linear`); time to ~1/6."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: nn.Module):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, odim, 3, 2),
            nn.ReLU(),
            nn.Conv2d(odim, odim, 5, 3),
            nn.ReLU(),
        )
        self.linear = nn.Linear(odim * (((idim - 1) // 2 - 2) // 3), odim)
        self.pos_enc = pos_enc_class
        # 10 = (3 - 1) * 1 + (5 - 1) * 2
        self.subsampling_rate = 6
        self.right_context = 10

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: int = 0):
        x = x.unsqueeze(1)  # (b, c, t, f)
        x = self.conv(x)
        b, c, t, f = x.size()
        x = self.linear(x.transpose(1, 2).contiguous().view(b, t, c * f))
        x, pos_emb = self.pos_enc(x, offset)
        return x, pos_emb, x_mask[:, :, 2::2][:, :, 4::3]


class Conv2dSubsampling8(BaseSubsampling):
    """Three Conv2d(.,d,3,2)+ReLU, Linear (named `linear`); time to ~1/8."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: nn.Module):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, odim, 3, 2),
            nn.ReLU(),
            nn.Conv2d(odim, odim, 3, 2),
            nn.ReLU(),
            nn.Conv2d(odim, odim, 3, 2),
            nn.ReLU(),
        )
        self.linear = nn.Linear(odim * ((((idim - 1) // 2 - 1) // 2 - 1) // 2), odim)
        self.pos_enc = pos_enc_class
        self.subsampling_rate = 8
        # 14 = (3 - 1) * 1 + (3 - 1) * 2 + (3 - 1) * 4
        self.right_context = 14

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: int = 0):
        x = x.unsqueeze(1)  # (b, c, t, f)
        x = self.conv(x)
        b, c, t, f = x.size()
        x = self.linear(x.transpose(1, 2).contiguous().view(b, t, c * f))
        x, pos_emb = self.pos_enc(x, offset)
        return x, pos_emb, x_mask[:, :, 2::2][:, :, 2::2][:, :, 2::2]


# --------------------------------------------------------------------------------------
# wenet/transformer/attention.py
# --------------------------------------------------------------------------------------
class MultiHeadedAttention(nn.Module):
    """Multi-head attention: linear_q/k/v/out, all with bias."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float):
        super().__init__()
        assert n_feat % n_head == 0
        # We assume d_v always equals d_k
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        n_batch = query.size(0)
        q = self.linear_q(query).view(n_batch, -1, self.h, self.d_k)
        k = self.linear_k(key).view(n_batch, -1, self.h, self.d_k)
        v = self.linear_v(value).view(n_batch, -1, self.h, self.d_k)
        q = q.transpose(1, 2)  # (batch, head, time1, d_k)
        k = k.transpose(1, 2)  # (batch, head, time2, d_k)
        v = v.transpose(1, 2)  # (batch, head, time2, d_k)
        return q, k, v

    def forward_attention(self, value: torch.Tensor, scores: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """mask: (B, 1, T2) or (B, T1, T2) bool, True = may attend."""
        n_batch = value.size(0)
        if mask.size(2) > 0:  # time2 > 0
            mask = mask.unsqueeze(1).eq(0)  # (batch, 1, *, time2)
            mask = mask[:, :, :, :scores.size(-1)]
            scores = scores.masked_fill(mask, -float('inf'))
            attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)  # (b, h, t1, t2)
        else:
            attn = torch.softmax(scores, dim=-1)  # (batch, head, time1, time2)

        p_attn = self.dropout(attn)
        x = torch.matmul(p_attn, value)  # (batch, head, time1, d_k)
        x = x.transpose(1, 2).contiguous().view(n_batch, -1, self.h * self.d_k)
        return self.linear_out(x)  # (batch, time1, d_model)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, pos_emb: torch.Tensor = torch.empty(0)) -> torch.Tensor:
        q, k, v = self.forward_qkv(query, key, value)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        return self.forward_attention(v, scores, mask)


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL style attention as WeNet has it: linear_pos (no bias), pos_bias_u/v
    (h, d_k), and no rel_shift ("useless in speech recognition")."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float):
        super().__init__(n_head, n_feat, dropout_rate)
        # linear transformation for positional encoding
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        # these two learnable bias are used in matrix c and matrix d
        # as described in https://arxiv.org/abs/1901.02860 Section 3.3
        self.pos_bias_u = nn.Parameter(torch.Tensor(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.Tensor(self.h, self.d_k))
        torch.nn.init.xavier_uniform_(self.pos_bias_u)
        torch.nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, pos_emb: torch.Tensor = torch.empty(0)) -> torch.Tensor:
        q, k, v = self.forward_qkv(query, key, value)
        q = q.transpose(1, 2)  # (batch, time1, head, d_k)

        n_batch_pos = pos_emb.size(0)
        p = self.linear_pos(pos_emb).view(n_batch_pos, -1, self.h, self.d_k)
        p = p.transpose(1, 2)  # (batch, head, time1, d_k)

        # (batch, head, time1, d_k)
        q_with_bias_u = (q + self.pos_bias_u).transpose(1, 2)
        # (batch, head, time1, d_k)
        q_with_bias_v = (q + self.pos_bias_v).transpose(1, 2)

        # compute attention score
        # first compute matrix a and matrix c
        # as described in https://arxiv.org/abs/1901.02860 Section 3.3
        # (batch, head, time1, time2)
        matrix_ac = torch.matmul(q_with_bias_u, k.transpose(-2, -1))

        # compute matrix b and matrix d
        # (batch, head, time1, time2)
        matrix_bd = torch.matmul(q_with_bias_v, p.transpose(-2, -1))
        # Remove rel_shift since it is useless in speech recognition,
        # and it requires special attention for streaming.
        # (WeNet applies rel_shift only when the shapes differ, i.e. for ESPnet's
        # 2T-1 long rel_pos_espnet; with rel_pos, p has length time2 and they match.)
        assert matrix_ac.shape == matrix_bd.shape

        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)  # (batch, head, time1, time2)
        return self.forward_attention(v, scores, mask)


# --------------------------------------------------------------------------------------
# wenet/transformer/positionwise_feed_forward.py
# --------------------------------------------------------------------------------------
class PositionwiseFeedForward(nn.Module):
    """w_2(dropout(activation(w_1(x))))."""

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float,
                 activation: nn.Module = nn.ReLU()):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(xs))))


class MoEFFNLayer(nn.Module):
    """WeNet's MoE FFN: gate Linear(d, E, bias=False); top-k of the gate logits, softmax
    over the k chosen (fp32); experts are PositionwiseFeedForward, computed by a loop.

    upcycle's options, off by default (= WeNet): `valid` (route only these positions,
    zeros elsewhere), router = "softmax_topk" (top-k of the full softmax, times E/k),
    capacity_factor (training: each expert keeps at most ceil(cf * N * k / E) token copies,
    dropping those of lowest weight; ties: earlier copy first), and the auxiliary losses
    kept in self.aux after each forward: balance = E * sum_i f_i * P_i (f_i: share of
    the token copies routed to i before dropping, P_i: mean router probability) and
    z = mean(logsumexp(logits)^2).
    """

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float,
                 activation: nn.Module = nn.ReLU(), bias: bool = True, n_expert: int = 8,
                 n_expert_activated: int = 2):
        super().__init__()
        self.gate = nn.Linear(idim, n_expert, bias=False)
        self.experts = nn.ModuleList(
            PositionwiseFeedForward(idim, hidden_units, dropout_rate, activation)
            for _ in range(n_expert))
        self.n_expert = n_expert
        self.n_expert_activated = n_expert_activated
        self.router = "topk_softmax"
        self.capacity_factor = 0.0
        self.aux = {}

    def forward(self, xs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, D = xs.size()
        xs = xs.reshape(-1, D)
        keep = None if valid is None else valid.reshape(-1).nonzero().squeeze(1)
        tokens = xs if keep is None else xs[keep]
        router = self.gate(tokens)
        k = self.n_expert_activated
        if self.router == "softmax_topk":
            weights, selected_experts = torch.topk(
                torch.softmax(router, dim=1, dtype=torch.float), k)
            weights = weights * (self.n_expert / k)
        else:
            logits, selected_experts = torch.topk(router, k)
            weights = torch.nn.functional.softmax(
                logits, dim=1, dtype=torch.float).to(dtype=xs.dtype)
        kept = torch.ones_like(selected_experts, dtype=torch.bool)
        n = tokens.size(0)
        if self.training and self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * n * k / self.n_expert)
            flat_sel, flat_w = selected_experts.reshape(-1), weights.reshape(-1)
            flat_kept = kept.reshape(-1)
            for i in range(self.n_expert):
                copies = torch.where(flat_sel == i)[0]
                order = torch.sort(-flat_w[copies].detach(), stable=True).indices
                flat_kept[copies[order[capacity:]]] = False
        output = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            mask = (selected_experts == i) & kept
            token_ids, ith_expert = torch.where(mask)
            output[token_ids] += weights[token_ids, ith_expert, None] * expert(
                tokens[token_ids])
        routed = torch.bincount(selected_experts.reshape(-1), minlength=self.n_expert)
        probs = torch.softmax(router, dim=1, dtype=torch.float)
        self.aux = {
            "balance": self.n_expert * torch.sum(routed / (n * k) * probs.mean(0)),
            "z": torch.logsumexp(router, dim=1).square().mean(),
            "tokens_per_expert": torch.bincount(selected_experts[kept],
                                                minlength=self.n_expert),
        }
        if keep is not None:
            output = torch.zeros_like(xs).index_copy(0, keep, output)
        return output.view(B, L, D)


WENET_MLP_CLASSES = {
    "position_wise_feed_forward": PositionwiseFeedForward,
    "moe": MoEFFNLayer,
}


# --------------------------------------------------------------------------------------
# wenet/transformer/convolution.py
# --------------------------------------------------------------------------------------
class ConvolutionModule(nn.Module):
    """pointwise_conv1 (C->2C) + GLU, depthwise_conv (K, causal: left pad K-1), norm,
    activation, pointwise_conv2; padded frames zeroed on the way in and out."""

    def __init__(self, channels: int, kernel_size: int = 15, activation: nn.Module = nn.ReLU(),
                 norm: str = "batch_norm", causal: bool = False, bias: bool = True):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, kernel_size=1, stride=1,
                                         padding=0, bias=bias)
        # self.lorder is used to distinguish if it's a causal convolution,
        # if self.lorder > 0: it's a causal convolution, the input will be
        #    padded with self.lorder frames on the left in forward.
        # else: it's a symmetrical convolution
        if causal:
            padding = 0
            self.lorder = kernel_size - 1
        else:
            # kernel_size should be an odd number for none causal convolution
            assert (kernel_size - 1) % 2 == 0
            padding = (kernel_size - 1) // 2
            self.lorder = 0
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, stride=1,
                                        padding=padding, groups=channels, bias=bias)

        assert norm in ['batch_norm', 'layer_norm']
        if norm == "batch_norm":
            self.use_layer_norm = False
            self.norm = nn.BatchNorm1d(channels)
        else:
            self.use_layer_norm = True
            self.norm = nn.LayerNorm(channels, eps=1e-5)

        self.pointwise_conv2 = nn.Conv1d(channels, channels, kernel_size=1, stride=1,
                                         padding=0, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool)):
        # exchange the temporal dimension and the feature dimension
        x = x.transpose(1, 2)  # (#batch, channels, time)

        # mask batch padding
        if mask_pad.size(2) > 0:  # time > 0
            x.masked_fill_(~mask_pad, 0.0)

        if self.lorder > 0:
            x = nn.functional.pad(x, (self.lorder, 0), 'constant', 0.0)

        # GLU mechanism
        x = self.pointwise_conv1(x)  # (batch, 2*channel, dim)
        x = nn.functional.glu(x, dim=1)  # (batch, channel, dim)

        # 1D Depthwise Conv
        x = self.depthwise_conv(x)
        if self.use_layer_norm:
            x = x.transpose(1, 2)
        x = self.activation(self.norm(x))
        if self.use_layer_norm:
            x = x.transpose(1, 2)
        x = self.pointwise_conv2(x)
        # mask batch padding
        if mask_pad.size(2) > 0:  # time > 0
            x.masked_fill_(~mask_pad, 0.0)

        return x.transpose(1, 2)


# --------------------------------------------------------------------------------------
# wenet/transformer/encoder_layer.py
# --------------------------------------------------------------------------------------
class ConformerEncoderLayer(nn.Module):
    """Macaron FFN (x0.5), self-attention, convolution module, FFN (x0.5), norm_final."""

    def __init__(self, size: int, self_attn: nn.Module,
                 feed_forward: Optional[nn.Module] = None,
                 feed_forward_macaron: Optional[nn.Module] = None,
                 conv_module: Optional[nn.Module] = None, dropout_rate: float = 0.1,
                 normalize_before: bool = True, norm_eps: float = 1e-5):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.feed_forward_macaron = feed_forward_macaron
        self.conv_module = conv_module
        self.norm_ff = nn.LayerNorm(size, eps=norm_eps)  # for the FNN module
        self.norm_mha = nn.LayerNorm(size, eps=norm_eps)  # for the MHA module
        if feed_forward_macaron is not None:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=norm_eps)
            self.ff_scale = 0.5
        else:
            self.ff_scale = 1.0
        if self.conv_module is not None:
            self.norm_conv = nn.LayerNorm(size, eps=norm_eps)  # for the CNN module
            self.norm_final = nn.LayerNorm(size, eps=norm_eps)  # for the block's output
        self.dropout = nn.Dropout(dropout_rate)
        self.size = size
        self.normalize_before = normalize_before

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool)):
        # whether to use macaron style
        if self.feed_forward_macaron is not None:
            residual = x
            if self.normalize_before:
                x = self.norm_ff_macaron(x)
            x = residual + self.ff_scale * self.dropout(self.feed_forward_macaron(x))
            if not self.normalize_before:
                x = self.norm_ff_macaron(x)

        # multi-headed self-attention module
        residual = x
        if self.normalize_before:
            x = self.norm_mha(x)
        x_att = self.self_attn(x, x, x, mask, pos_emb)
        x = residual + self.dropout(x_att)
        if not self.normalize_before:
            x = self.norm_mha(x)

        # convolution module
        if self.conv_module is not None:
            residual = x
            if self.normalize_before:
                x = self.norm_conv(x)
            x = self.conv_module(x, mask_pad)
            x = residual + self.dropout(x)
            if not self.normalize_before:
                x = self.norm_conv(x)

        # feed forward module
        residual = x
        if self.normalize_before:
            x = self.norm_ff(x)
        x = residual + self.ff_scale * self.dropout(self.feed_forward(x))
        if not self.normalize_before:
            x = self.norm_ff(x)

        if self.conv_module is not None:
            x = self.norm_final(x)

        return x, mask


# --------------------------------------------------------------------------------------
# wenet/transformer/encoder.py
# --------------------------------------------------------------------------------------
WENET_ACTIVATION_CLASSES = {
    "hardtanh": nn.Hardtanh,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "swish": nn.SiLU,  # getattr(torch.nn, "SiLU", Swish): x * sigmoid(x)
    "gelu": nn.GELU,
}
WENET_SUBSAMPLE_CLASSES = {
    "conv2d": Conv2dSubsampling4,
    "conv2d6": Conv2dSubsampling6,
    "conv2d8": Conv2dSubsampling8,
}
WENET_EMB_CLASSES = {
    "embed": PositionalEncoding,
    "abs_pos": PositionalEncoding,
    "rel_pos": RelPositionalEncoding,
}
WENET_ATTENTION_CLASSES = {
    "selfattn": MultiHeadedAttention,
    "rel_selfattn": RelPositionMultiHeadedAttention,
}


class ConformerEncoder(nn.Module):
    """BaseEncoder + ConformerEncoder: cmvn -> embed (subsampling + pos enc) -> layers ->
    after_norm."""

    def __init__(self, input_size: int, output_size: int = 256, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, dropout_rate: float = 0.1,
                 positional_dropout_rate: float = 0.1, attention_dropout_rate: float = 0.0,
                 input_layer: str = "conv2d", pos_enc_layer_type: str = "rel_pos",
                 normalize_before: bool = True, static_chunk_size: int = 0,
                 use_dynamic_chunk: bool = False, global_cmvn: Optional[nn.Module] = None,
                 use_dynamic_left_chunk: bool = False, positionwise_conv_kernel_size: int = 1,
                 macaron_style: bool = True, selfattention_layer_type: str = "rel_selfattn",
                 activation_type: str = "swish", use_cnn_module: bool = True,
                 cnn_module_kernel: int = 15, causal: bool = False,
                 cnn_module_norm: str = "batch_norm", norm_eps: float = 1e-5,
                 mlp_type: str = "position_wise_feed_forward", n_expert: int = 8,
                 n_expert_activated: int = 2):
        super().__init__()
        self._output_size = output_size
        self.global_cmvn = global_cmvn
        if input_layer not in WENET_SUBSAMPLE_CLASSES:
            raise NotImplementedError(f"input_layer {input_layer!r}")
        self.embed = WENET_SUBSAMPLE_CLASSES[input_layer](
            input_size, output_size, dropout_rate,
            WENET_EMB_CLASSES[pos_enc_layer_type](output_size, positional_dropout_rate))
        self.normalize_before = normalize_before
        self.after_norm = nn.LayerNorm(output_size, eps=norm_eps)
        self.static_chunk_size = static_chunk_size
        self.use_dynamic_chunk = use_dynamic_chunk
        self.use_dynamic_left_chunk = use_dynamic_left_chunk

        activation = WENET_ACTIVATION_CLASSES[activation_type]()
        # self-attention module definition
        encoder_selfattn_layer_args = (attention_heads, output_size, attention_dropout_rate)
        # feed-forward module definition
        positionwise_layer_args = (output_size, linear_units, dropout_rate, activation)
        mlp_class = WENET_MLP_CLASSES[mlp_type]
        if mlp_type == "moe":
            positionwise_layer_args += (True, n_expert, n_expert_activated)
        # convolution module definition
        convolution_layer_args = (output_size, cnn_module_kernel, activation, cnn_module_norm,
                                  causal)
        self.encoders = nn.ModuleList([
            ConformerEncoderLayer(
                output_size,
                WENET_ATTENTION_CLASSES[selfattention_layer_type](*encoder_selfattn_layer_args),
                mlp_class(*positionwise_layer_args),
                mlp_class(*positionwise_layer_args) if macaron_style else None,
                ConvolutionModule(*convolution_layer_args) if use_cnn_module else None,
                dropout_rate,
                normalize_before,
                norm_eps=norm_eps,
            ) for _ in range(num_blocks)
        ])

    def output_size(self) -> int:
        return self._output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, decoding_chunk_size: int = 0,
                num_decoding_left_chunks: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """xs (B, T, D), xs_lens (B,) -> (xs (B, T', d), masks (B, 1, T') bool pad mask).

        decoding_chunk_size: 0 = training (random dynamic chunk), <0 = full context,
        >0 = that chunk with num_decoding_left_chunks left chunks (<0: all of them).
        A random training chunk is full context or 1 + (U[1, T') % (100 // subsampling
        rate)): 25 for conv2d, 16 for conv2d6, 12 for conv2d8 (older WeNet: always 25).
        """
        T = xs.size(1)
        masks = ~make_pad_mask(xs_lens, T).unsqueeze(1)  # (B, 1, T)
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs, pos_emb, masks = self.embed(xs, masks)
        mask_pad = masks  # (B, 1, T/subsample_rate)
        chunk_masks = add_optional_chunk_mask(
            xs, masks, self.use_dynamic_chunk, self.use_dynamic_left_chunk,
            decoding_chunk_size, self.static_chunk_size, num_decoding_left_chunks,
            # Since we allow up to 1s(100 frames) delay, the maximum
            # chunk_size is 100 / 4 = 25.
            max_chunk_size=int(100.0 / self.embed.subsampling_rate))
        xs = self.forward_layers(xs, chunk_masks, pos_emb, mask_pad)
        if self.normalize_before:
            xs = self.after_norm(xs)
        # Here we assume the mask is not changed in encoder layers, so just
        # return the masks before encoder layers, and the masks will be used
        # for cross attention with decoder later
        return xs, masks

    def forward_layers(self, xs: torch.Tensor, chunk_masks: torch.Tensor,
                       pos_emb: torch.Tensor, mask_pad: torch.Tensor) -> torch.Tensor:
        for layer in self.encoders:
            xs, chunk_masks = layer(xs, chunk_masks, pos_emb, mask_pad)
        return xs


# --------------------------------------------------------------------------------------
# wenet/transformer/decoder_layer.py
# --------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Pre-norm self-attention (norm1), cross-attention (norm2), feed-forward (norm3)."""

    def __init__(self, size: int, self_attn: nn.Module, src_attn: Optional[nn.Module],
                 feed_forward: nn.Module, dropout_rate: float, normalize_before: bool = True,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.size = size
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.norm1 = nn.LayerNorm(size, eps=norm_eps)
        self.norm2 = nn.LayerNorm(size, eps=norm_eps)
        self.norm3 = nn.LayerNorm(size, eps=norm_eps)
        self.dropout = nn.Dropout(dropout_rate)
        self.normalize_before = normalize_before

    def forward(self, tgt: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor):
        residual = tgt
        if self.normalize_before:
            tgt = self.norm1(tgt)
        tgt_q = tgt
        tgt_q_mask = tgt_mask
        x = residual + self.dropout(self.self_attn(tgt_q, tgt, tgt, tgt_q_mask))
        if not self.normalize_before:
            x = self.norm1(x)

        if self.src_attn is not None:
            residual = x
            if self.normalize_before:
                x = self.norm2(x)
            x = residual + self.dropout(self.src_attn(x, memory, memory, memory_mask))
            if not self.normalize_before:
                x = self.norm2(x)

        residual = x
        if self.normalize_before:
            x = self.norm3(x)
        x = residual + self.dropout(self.feed_forward(x))
        if not self.normalize_before:
            x = self.norm3(x)

        return x, tgt_mask, memory, memory_mask


# --------------------------------------------------------------------------------------
# wenet/transformer/decoder.py
# --------------------------------------------------------------------------------------
class TransformerDecoder(nn.Module):
    """embed (Embedding, PositionalEncoding) -> decoders -> after_norm -> output_layer."""

    def __init__(self, vocab_size: int, encoder_output_size: int, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, dropout_rate: float = 0.1,
                 positional_dropout_rate: float = 0.1,
                 self_attention_dropout_rate: float = 0.0,
                 src_attention_dropout_rate: float = 0.0, input_layer: str = "embed",
                 use_output_layer: bool = True, normalize_before: bool = True,
                 src_attention: bool = True, activation_type: str = "relu",
                 norm_eps: float = 1e-5, mlp_type: str = "position_wise_feed_forward",
                 n_expert: int = 8, n_expert_activated: int = 2):
        super().__init__()
        attention_dim = encoder_output_size
        activation = WENET_ACTIVATION_CLASSES[activation_type]()
        mlp_class = WENET_MLP_CLASSES[mlp_type]
        mlp_args = (attention_dim, linear_units, dropout_rate, activation)
        if mlp_type == "moe":
            mlp_args += (True, n_expert, n_expert_activated)

        self.embed = nn.Sequential(
            nn.Embedding(vocab_size, attention_dim),
            WENET_EMB_CLASSES[input_layer](attention_dim, positional_dropout_rate),
        )
        self.normalize_before = normalize_before
        self.after_norm = nn.LayerNorm(attention_dim, eps=norm_eps)
        self.use_output_layer = use_output_layer
        if use_output_layer:
            self.output_layer = nn.Linear(attention_dim, vocab_size)
        else:
            self.output_layer = nn.Identity()
        self.num_blocks = num_blocks
        self.decoders = nn.ModuleList([
            DecoderLayer(
                attention_dim,
                MultiHeadedAttention(attention_heads, attention_dim,
                                     self_attention_dropout_rate),
                MultiHeadedAttention(attention_heads, attention_dim,
                                     src_attention_dropout_rate) if src_attention else None,
                mlp_class(*mlp_args),
                dropout_rate,
                normalize_before,
                norm_eps,
            ) for _ in range(self.num_blocks)
        ])

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                ys_in_pad: torch.Tensor, ys_in_lens: torch.Tensor,
                r_ys_in_pad: torch.Tensor = torch.empty(0), reverse_weight: float = 0.0):
        tgt = ys_in_pad
        maxlen = tgt.size(1)
        # tgt_mask: (B, 1, L)
        tgt_mask = ~make_pad_mask(ys_in_lens, maxlen).unsqueeze(1)
        tgt_mask = tgt_mask.to(tgt.device)
        # m: (1, L, L)
        m = subsequent_mask(tgt_mask.size(-1), device=tgt_mask.device).unsqueeze(0)
        # tgt_mask: (B, L, L)
        tgt_mask = tgt_mask & m
        x, _ = self.embed(tgt)
        for layer in self.decoders:
            x, tgt_mask, memory, memory_mask = layer(x, tgt_mask, memory, memory_mask)
        if self.normalize_before:
            x = self.after_norm(x)
        if self.use_output_layer:
            x = self.output_layer(x)
        olens = tgt_mask.sum(1)
        return x, torch.tensor(0.0), olens


class BiTransformerDecoder(nn.Module):
    """left_decoder (num_blocks) and right_decoder (r_num_blocks); the right one runs
    only when reverse_weight > 0."""

    def __init__(self, vocab_size: int, encoder_output_size: int, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, r_num_blocks: int = 0,
                 dropout_rate: float = 0.1, positional_dropout_rate: float = 0.1,
                 self_attention_dropout_rate: float = 0.0,
                 src_attention_dropout_rate: float = 0.0, input_layer: str = "embed",
                 use_output_layer: bool = True, normalize_before: bool = True,
                 src_attention: bool = True, activation_type: str = "relu",
                 norm_eps: float = 1e-5, mlp_type: str = "position_wise_feed_forward",
                 n_expert: int = 8, n_expert_activated: int = 2):
        super().__init__()

        def make(n):
            return TransformerDecoder(vocab_size, encoder_output_size, attention_heads,
                                      linear_units, n, dropout_rate, positional_dropout_rate,
                                      self_attention_dropout_rate, src_attention_dropout_rate,
                                      input_layer, use_output_layer, normalize_before,
                                      src_attention=src_attention,
                                      activation_type=activation_type, norm_eps=norm_eps,
                                      mlp_type=mlp_type, n_expert=n_expert,
                                      n_expert_activated=n_expert_activated)

        self.left_decoder = make(num_blocks)
        self.right_decoder = make(r_num_blocks)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                ys_in_pad: torch.Tensor, ys_in_lens: torch.Tensor, r_ys_in_pad: torch.Tensor,
                reverse_weight: float = 0.0):
        l_x, _, olens = self.left_decoder(memory, memory_mask, ys_in_pad, ys_in_lens)
        r_x = torch.tensor(0.0)
        if reverse_weight > 0.0:
            r_x, _, olens = self.right_decoder(memory, memory_mask, r_ys_in_pad, ys_in_lens)
        return l_x, r_x, olens


# --------------------------------------------------------------------------------------
# wenet/transformer/ctc.py
# --------------------------------------------------------------------------------------
class CTC(nn.Module):
    """ctc_lo Linear(d, vocab); loss = CTCLoss(sum, zero_infinity) / batch."""

    def __init__(self, odim: int, encoder_output_size: int, dropout_rate: float = 0.0,
                 reduce: bool = True, blank_id: int = 0):
        super().__init__()
        eprojs = encoder_output_size
        self.dropout_rate = dropout_rate
        self.ctc_lo = nn.Linear(eprojs, odim)
        reduction_type = "sum" if reduce else "none"
        self.ctc_loss = nn.CTCLoss(blank=blank_id, reduction=reduction_type,
                                   zero_infinity=True)

    def forward(self, hs_pad: torch.Tensor, hlens: torch.Tensor, ys_pad: torch.Tensor,
                ys_lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # hs_pad: (B, L, NProj) -> ys_hat: (B, L, Nvocab)
        # NOTE: WeNet's F.dropout here has training=True even in eval(); its rate is 0.0
        # (init_model never sets it).
        ys_hat = self.ctc_lo(F.dropout(hs_pad, p=self.dropout_rate))
        # ys_hat: (B, L, D) -> (L, B, D)
        ys_hat = ys_hat.transpose(0, 1)
        ys_hat = ys_hat.log_softmax(2)
        loss = self.ctc_loss(ys_hat, ys_pad, hlens, ys_lens)
        # Batch-size average
        loss = loss / ys_hat.size(1)
        ys_hat = ys_hat.transpose(0, 1)
        return loss, ys_hat

    def log_softmax(self, hs_pad: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.ctc_lo(hs_pad), dim=2)


# --------------------------------------------------------------------------------------
# wenet/transformer/label_smoothing_loss.py
# --------------------------------------------------------------------------------------
class LabelSmoothingLoss(nn.Module):
    """KL(smoothed one-hot || softmax(x)) summed over non-padding tokens, divided by the
    batch size (or by the token count when normalize_length)."""

    def __init__(self, size: int, padding_idx: int, smoothing: float,
                 normalize_length: bool = False):
        super().__init__()
        self.criterion = nn.KLDivLoss(reduction="none")
        self.padding_idx = padding_idx
        self.confidence = 1.0 - smoothing
        self.smoothing = smoothing
        self.size = size
        self.normalize_length = normalize_length

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert x.size(2) == self.size
        batch_size = x.size(0)
        x = x.view(-1, self.size)
        target = target.view(-1)
        # use zeros_like instead of torch.no_grad() for true_dist,
        # since no_grad() can not be exported by JIT
        true_dist = torch.zeros_like(x)
        true_dist.fill_(self.smoothing / (self.size - 1))
        ignore = target == self.padding_idx  # (B,)
        total = len(target) - ignore.sum().item()
        target = target.masked_fill(ignore, 0)  # avoid -1 index
        true_dist.scatter_(1, target.unsqueeze(1), self.confidence)
        kl = self.criterion(torch.log_softmax(x, dim=1), true_dist)
        denom = total if self.normalize_length else batch_size
        return kl.masked_fill(ignore.unsqueeze(1), 0).sum() / denom


# --------------------------------------------------------------------------------------
# wenet/transformer/asr_model.py
# --------------------------------------------------------------------------------------
class ASRModel(nn.Module):
    """CTC-attention hybrid encoder-decoder (U2++ with a BiTransformerDecoder)."""

    def __init__(self, vocab_size: int, encoder: ConformerEncoder, decoder: nn.Module,
                 ctc: CTC, ctc_weight: float = 0.5, ignore_id: int = IGNORE_ID,
                 reverse_weight: float = 0.0, lsm_weight: float = 0.0,
                 length_normalized_loss: bool = False,
                 special_tokens: Optional[dict] = None):
        assert 0.0 <= ctc_weight <= 1.0, ctc_weight
        super().__init__()
        # note that eos is the same as sos (equivalent ID)
        self.sos = (vocab_size - 1 if special_tokens is None else
                    special_tokens.get("<sos>", vocab_size - 1))
        self.eos = (vocab_size - 1 if special_tokens is None else
                    special_tokens.get("<eos>", vocab_size - 1))
        self.vocab_size = vocab_size
        self.ignore_id = ignore_id
        self.ctc_weight = ctc_weight
        self.reverse_weight = reverse_weight

        self.encoder = encoder
        self.decoder = decoder
        self.ctc = ctc
        self.criterion_att = LabelSmoothingLoss(
            size=vocab_size,
            padding_idx=ignore_id,
            smoothing=lsm_weight,
            normalize_length=length_normalized_loss,
        )

    def forward(self, batch: dict, device: torch.device) -> Dict[str, Optional[torch.Tensor]]:
        """WeNet 3.x's signature: batch has feats, feats_lengths, target, target_lengths."""
        out = self.compute(batch['feats'].to(device), batch['feats_lengths'].to(device),
                           batch['target'].to(device), batch['target_lengths'].to(device))
        return {k: out[k] for k in ("loss", "loss_att", "loss_ctc", "th_accuracy")}

    def compute(self, speech: torch.Tensor, speech_lengths: torch.Tensor, text: torch.Tensor,
                text_lengths: torch.Tensor, decoding_chunk_size: int = 0,
                num_decoding_left_chunks: int = -1) -> Dict[str, torch.Tensor]:
        """ASRModel.forward with every intermediate kept, and the encoder's chunk
        arguments exposed (WeNet's forward always passes 0/-1: a random dynamic chunk)."""
        assert text_lengths.dim() == 1, text_lengths.shape
        # Check that batch_size is unified
        assert (speech.shape[0] == speech_lengths.shape[0] == text.shape[0] ==
                text_lengths.shape[0]), (speech.shape, speech_lengths.shape, text.shape,
                                         text_lengths.shape)
        # 1. Encoder
        encoder_out, encoder_mask = self.encoder(speech, speech_lengths, decoding_chunk_size,
                                                 num_decoding_left_chunks)
        encoder_out_lens = encoder_mask.squeeze(1).sum(1)

        # 2a. CTC branch
        loss_ctc, ctc_probs = None, None
        if self.ctc_weight != 0.0:
            loss_ctc, ctc_probs = self.ctc(encoder_out, encoder_out_lens, text, text_lengths)

        # 2b. Attention-decoder branch
        loss_att, acc_att, decoder_out, r_decoder_out = None, None, None, None
        if self.ctc_weight != 1.0:
            loss_att, acc_att, decoder_out, r_decoder_out = self._calc_att_loss(
                encoder_out, encoder_mask, text, text_lengths)

        if loss_ctc is None:
            loss = loss_att
        elif loss_att is None:
            loss = loss_ctc
        else:
            loss = self.ctc_weight * loss_ctc + (1 - self.ctc_weight) * loss_att
        return {
            "loss": loss,
            "loss_att": loss_att,
            "loss_ctc": loss_ctc,
            "th_accuracy": acc_att,
            "encoder_out": encoder_out,
            "encoder_mask": encoder_mask,
            "ctc_log_probs": ctc_probs,
            "decoder_out": decoder_out,
            "r_decoder_out": r_decoder_out,
        }

    def _calc_att_loss(self, encoder_out: torch.Tensor, encoder_mask: torch.Tensor,
                       ys_pad: torch.Tensor, ys_pad_lens: torch.Tensor):
        ys_in_pad, ys_out_pad = add_sos_eos(ys_pad, self.sos, self.eos, self.ignore_id)
        ys_in_lens = ys_pad_lens + 1

        # reverse the seq, used for right to left decoder
        r_ys_pad = reverse_pad_list(ys_pad, ys_pad_lens, float(self.ignore_id))
        r_ys_in_pad, r_ys_out_pad = add_sos_eos(r_ys_pad, self.sos, self.eos, self.ignore_id)
        # 1. Forward decoder
        decoder_out, r_decoder_out, _ = self.decoder(encoder_out, encoder_mask, ys_in_pad,
                                                     ys_in_lens, r_ys_in_pad,
                                                     self.reverse_weight)
        # 2. Compute attention loss
        loss_att = self.criterion_att(decoder_out, ys_out_pad)
        r_loss_att = torch.tensor(0.0)
        if self.reverse_weight > 0.0:
            r_loss_att = self.criterion_att(r_decoder_out, r_ys_out_pad)
        loss_att = loss_att * (1 - self.reverse_weight) + r_loss_att * self.reverse_weight
        acc_att = th_accuracy(decoder_out.view(-1, self.vocab_size), ys_out_pad,
                              ignore_label=self.ignore_id)
        return loss_att, acc_att, decoder_out, r_decoder_out


# --------------------------------------------------------------------------------------
# wenet/utils/init_model.py
# --------------------------------------------------------------------------------------
def build_model(config: dict, vocab_size: int) -> ASRModel:
    """A WeNet train.yaml (as a dict) -> ASRModel, as init_model does for
    encoder: conformer, decoder: bitransformer | transformer, model: asr_model.

    The encoder always gets a GlobalCMVN (mean 0, istd 1 until set), as with a cmvn_file.
    """
    input_dim = config['input_dim']
    encoder_type = config.get('encoder', 'conformer')
    decoder_type = config.get('decoder', 'bitransformer')
    if encoder_type != 'conformer':
        raise NotImplementedError(f"encoder {encoder_type!r}")
    if config.get('model', 'asr_model') != 'asr_model':
        raise NotImplementedError(f"model {config.get('model')!r}")

    global_cmvn = GlobalCMVN(torch.zeros(input_dim), torch.ones(input_dim))
    encoder = ConformerEncoder(input_dim, global_cmvn=global_cmvn,
                               **config.get('encoder_conf', {}))
    if decoder_type == 'bitransformer':
        decoder = BiTransformerDecoder(vocab_size, encoder.output_size(),
                                       **config.get('decoder_conf', {}))
    elif decoder_type == 'transformer':
        conf = dict(config.get('decoder_conf', {}))
        conf.pop('r_num_blocks', None)
        decoder = TransformerDecoder(vocab_size, encoder.output_size(), **conf)
    else:
        raise NotImplementedError(f"decoder {decoder_type!r}")
    ctc_conf = config.get('ctc_conf', {})
    ctc = CTC(vocab_size, encoder.output_size(), blank_id=ctc_conf.get('ctc_blank_id', 0))
    special_tokens = config.get('tokenizer_conf', {}).get('special_tokens', None)
    return ASRModel(vocab_size=vocab_size, encoder=encoder, decoder=decoder, ctc=ctc,
                    special_tokens=special_tokens, **config.get('model_conf', {}))
