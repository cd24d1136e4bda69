"""The next turn's prefix, decoded while the model would otherwise wait for it.

After an answer the KV cache holds the prompt and the generated tokens: for a turn without thinking
that is `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n` + the answer. The reference's template
renders a past assistant turn as `<|im_start|>assistant\\n` + its content only (an empty or earlier
thinking block is dropped; docs/reference-model.md §5.3), so the next turn's prompt differs from the
cache right after `assistant\\n`, and the answer must be decoded again before the new question. A
client of the HTTP API resends the whole conversation, so the server knows what that prompt will be:
`history_prefix` is the conversation with the answer, as the next turn renders it, up to the content
of the next (user) message, and `warm` decodes it while no request waits, in chunks, stopping as soon as one
arrives. The cache then holds exactly what a cold prefill of the next prompt would put there, and the
follow-up decodes only its own new tokens. Only text after the last image or video is decoded here.
"""

from __future__ import annotations

from typing import Callable

from .kv_cache import KVContents, chunk_steps, plan_steps
from .prompt import prompt_options

USER_OPENING = "<|im_start|>user\n"
WARM_CHUNK = 32  # positions per decode: a request arriving meanwhile waits for at most one (batch.CHUNK)


def history_prefix(model, msgs: list[dict], answer: str, kwargs: dict) -> KVContents | None:
    """The KV contents the next turn of `msgs` (answered with `answer`) starts with: through the end of
    the answer's turn and the opening of a user message. `kwargs` are chat()'s (the prompt's options)."""
    nxt = [*msgs, {"role": "assistant", "content": [answer]}, {"role": "user", "content": ["?"]}]
    seq, _ = model.prompt_runs(model.build_prompt(nxt, **prompt_options(kwargs)))
    last = seq.runs[-1]
    start_id = model.lm.token_id("<|im_start|>")
    opens = [i for i, t in enumerate(last.tokens) if t == start_id] if not last.is_slot else []
    if len(opens) < 2:  # the question and the generation prompt each open a message
        return None
    # the next message's opening too, as a client continues a chat: a user's (where it is something
    # else, the follow-up's prompt differs from there and those few positions are decoded again)
    cut, head = opens[-2], model.lm.tokenize(USER_OPENING)
    if last.tokens[cut : cut + len(head)] == head:
        cut += len(head)
    return seq.prefix(len(seq) - len(last) + cut)


def text_left(kv: KVContents, target: KVContents) -> int | None:
    """Where `target`'s text still to decode starts, given the sequence holds `kv`; None if nothing is
    left, or if images or video would have to be decoded first."""
    keep = kv.common_prefix(target, limit=len(target))
    after_media = max((p + len(r) for p, r in target.slots()), default=0)
    if keep >= len(target) or keep < after_media:
        return None
    return keep


def warm_chunks(target: KVContents, keep: int, size: int = WARM_CHUNK) -> list[tuple[int, list[int]]]:
    """(position, tokens) batches decoding `target` from `keep` on (text only)."""
    out = []
    for emb, parts in chunk_steps(plan_steps(target, keep, fuse=False), size):
        assert not emb, "text_left never leaves media to decode"
        out.append((parts[0].start, [t for p in parts for t in p.run.tokens[p.lo : p.hi]]))
    return out


def warm(model, msgs: list[dict], answer: str, kwargs: dict, stop: Callable[[], bool]) -> int:
    """Decode the next turn's prefix into `model`'s KV cache (one conversation at a time, MiniCPMV.chat's
    cache) until done or `stop()`; returns the positions decoded."""
    with model._turn.call():
        target = history_prefix(model, msgs, answer, kwargs)
        ctx = model.ctx
        if target is None or ctx is None or len(target) + 1 > ctx.n_ctx:
            return 0
        keep = text_left(model._kv, target)
        if keep is None:
            return 0
        if not ctx.truncate(keep):
            model._clear()
            return 0
        model._kv = model._kv.prefix(keep)
        done = 0
        for pos, tokens in warm_chunks(target, keep):
            if stop():
                break
            try:
                ctx.decode_tokens(tokens, pos, logits_last=False)
            except BaseException:
                model._clear()  # a failed batch may have left part of itself in the cache
                raise
            model._kv = target.prefix(pos + len(tokens))
            done += len(tokens)
        return done
