"""Conversation -> the reference's prompt, as text pieces and image slots.

The reference `chat()` (docs/reference-model.md §5) does three things, reproduced here in order:

1. every message's content list becomes one string: images as the tag "(<image>./</image>)",
   strings as they are, joined with "\\n"; `system_prompt` becomes a leading system message;
2. the checkpoint's chat template renders the messages (ChatML; past assistant answers lose their
   think block; the generation prompt ends with "<think>\\n\\n</think>\\n\\n" when thinking is off
   and "<think>\\n" when on);
3. the processor replaces each tag by the image placeholder: "<image_id>i</image_id>" (if
   use_image_id), "<image>" + 64 slots + "</image>", then the slice rows. With temporal_ids, the
   2nd..nth frames of every group get no placeholder and the text before them is stripped, so a
   group of frames is one placeholder.

Instead of 64 "<unk>" strings per slot we emit a `Slot` (the runtime feeds 64 embedding rows
there); the text between slots is tokenized by llama.cpp with special tokens parsed. Special tokens
sit on both sides of every slot, so tokenizing the pieces separately gives the same ids as the
reference tokenizing the whole string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from minicpmv.schema import MAX_SLICE_NUMS, QUERY_NUM, THINK_END, THINK_START

from .image import get_sliced_grid

IMAGE_TAG = "(<image>./</image>)"


class PromptError(ValueError):
    """Malformed conversation; the message is one line."""


@dataclass(frozen=True)
class Slot:
    """64 embedding rows: the overview (index 0) or a slice (1..) of `Prompt.media[media_index]`."""

    media_index: int
    index: int


@dataclass
class Media:
    """One placeholder's worth of pixels: an image, or a temporal group of video frames."""

    frames: list[Image.Image]
    temporal_ids: list[int] | None  # None for a still image (reference: group [-1])
    grid: tuple[int, int] | None  # (cols, rows) of the slices, None if not sliced

    @property
    def n_slots(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)


@dataclass
class Prompt:
    segments: list[str | Slot]  # text pieces and slots, in order
    media: list[Media] = field(default_factory=list)
    text: str = ""  # the rendered chat template, before tag expansion
    max_slice_nums: int = MAX_SLICE_NUMS  # the slicing the placeholders were built for

    def token_ids(self, tokenize, slot_id: int, query_num: int = QUERY_NUM) -> list[int]:
        """Flat token ids with every slot shown as `query_num` copies of `slot_id` (the reference's
        `<unk>` placeholders); `tokenize(str) -> list[int]`."""
        out: list[int] = []
        for s in self.segments:
            out += [slot_id] * query_num if isinstance(s, Slot) else tokenize(s)
        return out


# --------------------------------------------------------------------------- step 1: messages


def flatten_messages(msgs: list[dict], system_prompt: str = "") -> tuple[list[dict], list[Image.Image]]:
    """Reference `chat()` message handling: content lists -> one string per message (images as
    IMAGE_TAG, joined with "\\n"), images collected in order. Items must already be PIL images or
    str (the runtime loads paths first); other items are an error (the reference drops them
    silently, which hides mistakes)."""
    if not msgs:
        raise PromptError("msgs is empty")
    out, images = [], []
    for i, msg in enumerate(msgs):
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant"):
            raise PromptError(f"msgs[{i}]: role must be 'user' or 'assistant', got {role!r}")
        if i == 0 and role != "user":
            raise PromptError("msgs[0]: the first message must have role 'user'")
        if isinstance(content, str):
            content = [content]
        parts = []
        for c in content:
            if isinstance(c, Image.Image):
                images.append(c)
                parts.append(IMAGE_TAG)
            elif isinstance(c, str):
                if IMAGE_TAG in c:
                    raise PromptError(f"msgs[{i}]: text contains the reserved image tag {IMAGE_TAG!r}")
                parts.append(c)
            else:
                raise PromptError(f"msgs[{i}]: content items must be text or images, got {type(c).__name__}")
        out.append({"role": role, "content": "\n".join(parts)})
    if system_prompt:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out, images


# --------------------------------------------------------------------------- step 2: template


def _split_think(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, as the template splits it."""
    if THINK_END not in content:
        return "", content
    answer = content.split(THINK_END)[-1].lstrip("\n")
    reasoning = content.split(THINK_END)[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
    return reasoning, answer


def render_chat(
    messages: list[dict], *, enable_thinking: bool | None = False, add_generation_prompt: bool = True
) -> str:
    """The checkpoint's Jinja chat template (no tools) for system/user/assistant messages.

    An assistant message after the last user message keeps its think block (rendered as
    "<think>\\n{reasoning}\\n</think>\\n\\n{answer}") when it is the last message or has reasoning;
    every other assistant message is rendered with its answer only.
    """
    out = []
    if messages and messages[0]["role"] == "system":
        out.append(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n")
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        c = m["content"]
        if m["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            last_query = i
            break
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "user" or (role == "system" and i > 0):
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            reasoning, answer = _split_think(content)
            last = i == len(messages) - 1
            if i > last_query and (last or reasoning):
                out.append(
                    f"<|im_start|>assistant\n{THINK_START}\n{reasoning.strip(chr(10))}\n{THINK_END}\n\n"
                    f"{answer.lstrip(chr(10))}"
                )
            else:
                out.append(f"<|im_start|>assistant\n{answer}")
            out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
        if enable_thinking is False:
            out.append(f"{THINK_START}\n\n{THINK_END}\n\n")
        elif enable_thinking is True:
            out.append(f"{THINK_START}\n")
    return "".join(out)


# --------------------------------------------------------------------------- step 3: placeholders


def _group_frames(n_images: int, temporal_ids: list[list[int]] | None) -> list[tuple[int, int]]:
    """(first image index, group size) per placeholder."""
    if temporal_ids is None:
        return [(i, 1) for i in range(n_images)]
    sizes = [len(g) for g in temporal_ids]
    if any(s < 1 for s in sizes) or sum(sizes) != n_images:
        raise PromptError(
            f"temporal_ids groups hold {sum(sizes)} frame ids but the conversation has "
            f"{n_images} images; every image (frame) needs exactly one id"
        )
    out, start = [], 0
    for s in sizes:
        out.append((start, s))
        start += s
    return out


def place_media(
    text: str,
    images: list[Image.Image],
    *,
    max_slice_nums: int = MAX_SLICE_NUMS,
    use_image_id: bool = True,
    temporal_ids: list[list[int]] | None = None,
    query_num: int = QUERY_NUM,
) -> Prompt:
    """Replace the image tags of a rendered prompt by placeholders made of text and `Slot`s."""
    chunks = text.split(IMAGE_TAG)
    if len(chunks) - 1 != len(images):
        raise PromptError(f"the prompt holds {len(chunks) - 1} image tags for {len(images)} images")
    groups = _group_frames(len(images), temporal_ids)
    first_of = {start: (k, size) for k, (start, size) in enumerate(groups)}
    media: list[Media] = []
    segs: list[str | Slot] = []

    def add_text(s: str) -> None:
        if not s:
            return
        if segs and isinstance(segs[-1], str):
            segs[-1] += s
        else:
            segs.append(s)

    for i in range(len(images)):
        if i not in first_of:  # 2nd..nth frame of a group: no placeholder, text stripped
            add_text(chunks[i].strip())
            continue
        k, size = first_of[i]
        frames = images[i : i + size]
        grid = get_sliced_grid(frames[0].size, max_slice_nums) if max_slice_nums > 1 else None
        for f in frames[1:]:
            g = get_sliced_grid(f.size, max_slice_nums) if max_slice_nums > 1 else None
            if g != grid:
                raise PromptError(
                    f"frames of one temporal group slice differently ({grid} vs {g}); "
                    "give the frames of a group the same size"
                )
        m = len(media)
        tids = temporal_ids[k] if temporal_ids is not None else None
        media.append(Media(list(frames), tids, grid))
        add_text(chunks[i])
        if use_image_id:
            add_text(f"<image_id>{i}</image_id>")
        add_text("<image>")
        segs.append(Slot(m, 0))
        add_text("</image>")
        if grid is not None:
            cols, rows = grid
            for r in range(rows):
                if r:
                    add_text("\n")
                for c in range(cols):
                    add_text("<slice>")
                    segs.append(Slot(m, 1 + r * cols + c))
                    add_text("</slice>")
    add_text(chunks[-1])
    return Prompt(segs, media, text, max_slice_nums)


# chat()'s keyword arguments that shape the prompt (MiniCPMV.build_prompt's options; the rest is sampling)
PROMPT_OPTIONS = ("enable_thinking", "system_prompt", "max_slice_nums", "use_image_id", "temporal_ids")


def prompt_options(chat_kwargs: dict) -> dict:
    """The MiniCPMV.build_prompt options among chat()'s keyword arguments."""
    return {k: chat_kwargs[k] for k in PROMPT_OPTIONS if k in chat_kwargs}


def build_prompt(
    msgs: list[dict],
    *,
    system_prompt: str = "",
    enable_thinking: bool = False,
    max_slice_nums: int = MAX_SLICE_NUMS,
    use_image_id: bool = True,
    temporal_ids: list[list[int]] | None = None,
    query_num: int = QUERY_NUM,
) -> Prompt:
    """The reference's full prompt for `msgs` (content items: str or PIL images)."""
    messages, images = flatten_messages(msgs, system_prompt)
    text = render_chat(messages, enable_thinking=enable_thinking, add_generation_prompt=True)
    return place_media(
        text,
        images,
        max_slice_nums=max_slice_nums,
        use_image_id=use_image_id,
        temporal_ids=temporal_ids,
        query_num=query_num,
    )
