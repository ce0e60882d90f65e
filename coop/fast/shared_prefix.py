"""The text tower for prompts that share their first tokens (``FAST.TEXT`` shared_prefix).

With a unified context and the class token at the end, the start token and the context are
the same for every class, and under the causal mask so are their hidden states: they are
computed once, and each class runs only over its own tokens up to its end-of-text token,
attending to the prefix's keys and values. The fewest FLOPs of the text paths (but more
operations than the truncated path; :func:`coop.fast.text.text_mode` chooses).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from coop.clip_adapter import TextEncoder


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(n, S, D) -> (n, heads, S, D / heads)."""
    n, s, d = t.shape
    return t.reshape(n, s, heads, d // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(n, heads, S, hd) -> (n, S, heads * hd)."""
    n, h, s, hd = t.shape
    return t.transpose(1, 2).reshape(n, s, h * hd)


# Query rows per attention problem of the class suffixes: consecutive classes are packed into
# blocks of this many token rows (a class longer than that gets a block of its own length),
# attended to at once under a block-diagonal causal mask; far fewer and larger problems than
# one per class.
_SUFFIX_BLOCK_ROWS = 24


class _SuffixBlocks(NamedTuple):
    """Where the packed class suffixes sit in the attention blocks (see
    :func:`_suffix_blocks`)."""

    nb: int  # blocks
    rows: torch.Tensor  # (nb * R,) row of cat(prefix, suffixes) in each block slot
    slots: torch.Tensor  # (T,) the block slot of each packed suffix row
    mask: torch.Tensor  # (nb, 1, R, P + R) bool: what each slot's query may attend to
    last_rows: torch.Tensor  # (n,) row of each class's last token
    last_query_rows: torch.Tensor  # (nb * C,) the same, laid out per block (C classes max)
    last_slots: torch.Tensor  # (n,) each class's position in that layout
    last_mask: torch.Tensor  # (nb, 1, C, P + R) bool


@functools.lru_cache(maxsize=64)
def _suffix_blocks(lengths: Tuple[int, ...], p: int, block_rows: int, device: str) -> _SuffixBlocks:
    """Pack classes (suffix ``lengths``, after a prefix of ``p`` rows) greedily, in order,
    into blocks of ``R = max(block_rows, longest)`` slots. A query slot may attend to every
    prefix key and, causally, to the keys of its own class; empty slots read row 0, are never
    attended to, and their outputs are dropped. Built outside inference mode (the tensors are
    reused by later passes that record gradients)."""
    with torch.inference_mode(False):
        r = max(block_rows, max(lengths))
        block, offset, first_of_block = [], [], []
        b, used = 0, 0
        for k, length in enumerate(lengths):
            if k == 0 or used + length > r:
                if k:
                    b, used = b + 1, 0
                first_of_block.append(k)
            block.append(b)
            offset.append(used)
            used += length
        nb = b + 1
        dev = torch.device(device)
        ln = torch.tensor(lengths)
        n, t = len(lengths), int(ln.sum())
        cls = torch.repeat_interleave(torch.arange(n), ln)  # class of each packed row
        start = torch.cumsum(ln, 0) - ln
        pos = torch.arange(t) - start[cls]  # position of each packed row within its class
        slots = torch.tensor(block)[cls] * r + torch.tensor(offset)[cls] + pos
        rows = torch.zeros(nb * r, dtype=torch.long)
        rows[slots] = p + torch.arange(t)
        slot_cls = torch.full((nb * r,), -1, dtype=torch.long)
        slot_cls[slots] = cls
        slot_pos = torch.zeros(nb * r, dtype=torch.long)
        slot_pos[slots] = pos
        sc, sp = slot_cls.view(nb, r), slot_pos.view(nb, r)
        filled = (sc >= 0)[:, None, :]
        own = (sc[:, :, None] == sc[:, None, :]) & (sp[:, :, None] >= sp[:, None, :]) & filled
        mask = torch.cat([torch.ones(nb, r, p, dtype=torch.bool), own], dim=-1).unsqueeze(1)
        # the last layer: one query per class, at its last token, C per block
        index_in_block = torch.arange(n) - torch.tensor(first_of_block)[torch.tensor(block)]
        c = int(index_in_block.max()) + 1
        last_rows = p + start + ln - 1
        last_slots = torch.tensor(block) * c + index_in_block
        last_query_rows = torch.zeros(nb * c, dtype=torch.long)
        last_query_rows[last_slots] = last_rows
        query_cls = torch.full((nb * c,), -2, dtype=torch.long)  # -2: an empty query slot
        query_cls[last_slots] = torch.arange(n)
        own_last = (query_cls.view(nb, c)[:, :, None] == sc[:, None, :]) & filled
        last_mask = torch.cat([torch.ones(nb, c, p, dtype=torch.bool), own_last], dim=-1)
        return _SuffixBlocks(
            nb=nb,
            rows=rows.to(dev),
            slots=slots.to(dev),
            mask=mask.to(dev),
            last_rows=last_rows.to(dev),
            last_query_rows=last_query_rows.to(dev),
            last_slots=last_slots.to(dev),
            last_mask=last_mask.unsqueeze(1).to(dev),
        )


@functools.lru_cache(maxsize=64)
def _pack_index(lengths: Tuple[int, ...], device: str) -> torch.Tensor:
    """Rows of the (n * max(lengths)) padded suffix rows that belong to a class, in order:
    the packing of the suffixes as a gather with a fixed index (a boolean mask would read
    its count back to the host). Built outside inference mode, like :func:`_suffix_blocks`."""
    with torch.inference_mode(False):
        lm = max(lengths)
        idx = [i * lm + j for i, length in enumerate(lengths) for j in range(length)]
        return torch.tensor(idx, dtype=torch.long).to(torch.device(device))


def suffix_lengths(tokenized_prompts: torch.Tensor, prefix_len: int) -> Tuple[int, ...]:
    """Each prompt's token count after a shared prefix of ``prefix_len`` tokens, up to and
    including its end-of-text token (read on the host once, not every step)."""
    eot = tokenized_prompts.argmax(dim=-1)
    if int(eot.min()) < prefix_len:
        raise ValueError("an end-of-text token lies inside the shared prefix")
    return tuple(int(v) for v in (eot - prefix_len + 1).tolist())


def encode_shared_prefix(
    transformer: nn.Module, x_p: torch.Tensor, x_s: torch.Tensor, lengths: Sequence[int]
) -> torch.Tensor:
    """The last layer's outputs at each class's last position, (n, D), of prompts made of a
    shared prefix followed by per-class suffixes, under CLIP's causal mask.

    ``x_p`` (P, D) is the prefix's input (embeddings plus positions), ``x_s`` (T, D) the
    suffixes' inputs packed one class after another, ``lengths`` the n suffix lengths (summing
    to T). Prefix and suffix rows go through every per-token operation (layer norms,
    projections, MLP) together, once per layer. The attention runs twice per layer: once for
    the prefix (causal), and once for all the classes, packed in blocks of rows; a token
    attends to the prefix's keys and values and, causally, to its own class's. In the last
    layer only each class's last position is computed beyond its key and value.
    """
    p, d = x_p.shape
    blk = _suffix_blocks(tuple(int(v) for v in lengths), p, _SUFFIX_BLOCK_ROWS, str(x_s.device))
    nb = blk.nb

    x = torch.cat([x_p, x_s])
    blocks = list(transformer.resblocks)
    for i, block in enumerate(blocks):
        final = i + 1 == len(blocks)
        heads = block.attn.num_heads
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        h = block.ln_1(x)
        if final:  # only the last positions' outputs are used
            k, v = F.linear(h, w[d:], b[d:]).chunk(2, dim=-1)
        else:
            q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
        # (index_select, whose backward is a plain index_add, rather than indexing)
        k_s = torch.cat([k[:p].expand(nb, p, d), k.index_select(0, blk.rows).view(nb, -1, d)], 1)
        v_s = torch.cat([v[:p].expand(nb, p, d), v.index_select(0, blk.rows).view(nb, -1, d)], 1)
        k_s, v_s = _split_heads(k_s, heads), _split_heads(v_s, heads)
        if final:
            q_l = F.linear(h.index_select(0, blk.last_query_rows), w[:d], b[:d])
            q_l = _split_heads(q_l.view(nb, -1, d), heads)
            a_l = F.scaled_dot_product_attention(q_l, k_s, v_s, attn_mask=blk.last_mask)
            att = _merge_heads(a_l).reshape(-1, d).index_select(0, blk.last_slots)
            x = x.index_select(0, blk.last_rows)
        else:
            a_p = F.scaled_dot_product_attention(
                _split_heads(q[None, :p], heads),
                _split_heads(k[None, :p], heads),
                _split_heads(v[None, :p], heads),
                is_causal=True,
            )
            a_s = F.scaled_dot_product_attention(
                _split_heads(q.index_select(0, blk.rows).view(nb, -1, d), heads),
                k_s,
                v_s,
                attn_mask=blk.mask,
            )
            a_s = _merge_heads(a_s).reshape(-1, d).index_select(0, blk.slots)
            att = torch.cat([_merge_heads(a_p)[0], a_s])
        x = x + F.linear(att, block.attn.out_proj.weight, block.attn.out_proj.bias)
        x = x + block.mlp(block.ln_2(x))
    return x


class SharedPrefixTextEncoder(TextEncoder):
    """CLIP's text tower for prompts that share their first ``P`` token embeddings.

    With a unified context and the class token at the end, the start token and the context
    tokens are the same for every class, and under the causal mask so are their hidden
    states. They are computed once; each class then runs only over its own tokens up to its
    end-of-text token, attending to the prefix's keys and values. Gradients flow to the
    prefix (the learnable context). ``class_chunk`` > 0 processes the classes in chunks with
    activation checkpointing, bounding memory for many classes. Equal to
    :class:`TextEncoder` up to float rounding.
    """

    def __init__(self, clip_model: nn.Module, class_chunk: int = 0) -> None:
        super().__init__(clip_model)
        self.class_chunk = class_chunk

    def forward(  # type: ignore[override]
        self,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        lengths: Optional[Tuple[int, ...]] = None,
    ) -> torch.Tensor:
        """``prefix`` (P, D) shared embeddings, ``suffix`` (n, 77 - P, D) per-class
        embeddings, ``tokenized_prompts`` (n, 77) -> text features (n, embed_dim).
        ``lengths``: :func:`suffix_lengths` of the prompts, computed once by the caller; with
        them nothing in the pass reads a value back from the device."""
        p, d = prefix.shape
        pos = self.positional_embedding.type(self.dtype)
        if lengths is None:
            lengths = suffix_lengths(tokenized_prompts, p)
        x_p = prefix + pos[:p]
        # each class runs only up to its own end-of-text token
        n = len(lengths)
        chunked = bool(self.class_chunk) and torch.is_grad_enabled() and n > self.class_chunk
        step = self.class_chunk if chunked else n

        def run(x_prefix: torch.Tensor, a: int, b: int) -> torch.Tensor:
            # classes a..b-1 -> their features at the end-of-text tokens, (b - a, embed_dim)
            lens = tuple(lengths[a:b])
            lm = max(lens)
            padded = suffix[a:b, :lm] + pos[p : p + lm]
            # packed, one class after another
            x_s = padded.reshape(-1, d).index_select(0, _pack_index(lens, str(suffix.device)))
            h = encode_shared_prefix(self.transformer, x_prefix, x_s, lens)
            return self.ln_final(h).type(self.dtype) @ self.text_projection

        if not chunked:
            return run(x_p, 0, n)
        from torch.utils.checkpoint import checkpoint

        outs = [
            checkpoint(run, x_p, a, min(a + step, n), use_reentrant=False)
            for a in range(0, n, step)
        ]
        return torch.cat(outs)
