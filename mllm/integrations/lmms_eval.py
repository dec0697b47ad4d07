"""An lmms-eval model class, so any lmms-eval task can evaluate an mllm checkpoint.

    pip install 'mllm[lmms]'        # lmms-eval itself (it needs torchvision: a GPU machine, in practice)
    lmms-eval --model mllm --model_args pretrained=runs/x/instruct/final --tasks mme,pope

The class is registered through the `lmms_eval.models` entry point (pyproject.toml), which lmms-eval
0.7+ reads at start-up, so nothing is copied into lmms-eval's tree. It implements the three request
types of `lmms_eval.api.model.lmms` with this project's own prompt building (`encode_conversation`,
the model's training template and `<image>` expansion), so a benchmark sees the model exactly as
`mllm chat` and `mllm eval` do.

Request arguments, as lmms-eval's "simple" models receive them (`Instance.args`):
- generate_until: (context, gen_kwargs, doc_to_visual, doc_id, task, split)
- loglikelihood: (context, doc_to_target, doc_to_visual, doc_id, task, split) -> (sum log P(cont), greedy?)
- generate_until_multi_round: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split); rounds
  continue while `doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)` returns a
  false terminal signal.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from mllm.chat import IGNORE_INDEX, with_image
from mllm.inference import prompt_ids, stop_ids
from mllm.loading import resolve_model_dir
from mllm.model import MultimodalLM

__all__ = ["MllmLMMS", "manifest"]

MODEL_NAME = "mllm"


def manifest():
    """Entry point `lmms_eval.models`: lmms-eval's registry resolves `--model mllm` to `MllmLMMS`."""
    # lmms-eval is optional (the `lmms` extra); it is installed wherever it calls this entry point.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MllmLMMS")


def _flatten(visuals: Any) -> list[Image.Image]:
    out: list[Image.Image] = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        elif isinstance(v, Image.Image):
            out.append(v.convert("RGB"))
        else:
            raise ValueError(
                f"mllm (lmms-eval): visual of type {type(v).__name__} is not supported (images only)"
            )
    return out


def _with_images(context: str, n: int, placement: str = "before") -> str:
    """The model's own prompt (`meta.image_placement`; "before" is LLaVA's evaluation prompt), unless the
    task placed the `<image>` markers itself."""
    if n == 0 or "<image>" in context:
        return context
    return with_image(context, placement, n)


class MllmLMMS(lmms):
    """`--model mllm --model_args pretrained=DIR[,device=cuda,dtype=bf16,max_new_tokens=N]`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str = "fp32",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"mllm (lmms-eval): unknown model_args {sorted(kwargs)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.model = MultimodalLM.from_pretrained(resolve_model_dir(pretrained), torch_dtype=torch_dtype)
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    # ------------------------------------------------------------------ helpers
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor | None:
        return self.model.preprocess(images).to(self.device) if images else None

    @torch.no_grad()
    def _generate(self, turns: list[tuple[str, str]], images: list[Image.Image], gen_kwargs: dict) -> str:
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(gen.pop("temperature", 0) or 0)
        top_p = gen.pop("top_p", None)
        ids = prompt_ids(self.model, turns, len(images)).unsqueeze(0).to(self.device)
        new = self.model.generate(
            ids,
            self._pixels(images),
            max_new_tokens=max_new,
            do_sample=temperature > 0,
            temperature=temperature or 1.0,
            top_p=float(top_p) if top_p else 1.0,
            stop_token_ids=stop_ids(self.model),
        )
        text = self.model.tokenizer.decode(new[0].cpu(), skip_special_tokens=True)
        for stop in until:  # lmms-eval's stop strings: the answer ends before the first one
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()

    # ------------------------------------------------------------------ lmms API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            images = _flatten(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual else []
            out.append(
                self._generate(
                    [("user", _with_images(context, len(images), self.model.meta.image_placement))],
                    images,
                    gen_kwargs,
                )
            )
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = _flatten(doc_to_visual(doc)) if doc_to_visual else []
            prompt = prompt_ids(
                self.model,
                [("user", _with_images(context, len(images), self.model.meta.image_placement))],
                len(images),
            )
            cont = self.model.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")[
                "input_ids"
            ][0]
            if cont.numel() == 0:
                raise ValueError(f"mllm (lmms-eval): empty continuation for {task}/{split}/{doc_id}")
            ids = torch.cat([prompt, cont]).unsqueeze(0).to(self.device)
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[0, len(prompt) :] = cont.to(self.device)
            res = self.model(ids, torch.ones_like(ids), self._pixels(images), labels, return_logits=True)
            logprobs = torch.log_softmax(res.logits.float(), dim=-1)
            target = cont.to(self.device)
            total = float(logprobs.gather(-1, target[:, None]).sum())
            out.append((total, bool((res.logits.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        out: list[Any] = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in [
            r.args for r in requests
        ]:
            doc = self._doc(task, split, doc_id)
            images = _flatten(doc_to_visual(doc)) if doc_to_visual else []
            turns: list[tuple[str, str]] = []
            answers: list[str] = []
            round_res: Any = None
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, round_res, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                    )
                    if terminal:
                        break
                    extra = _flatten(visuals) if visuals else []
                    if extra:  # a round that shows new images starts the conversation over with them
                        images, turns = extra, []
                n_new = len(images) if not turns else 0
                turns.append(("user", _with_images(context, n_new, self.model.meta.image_placement)))
                answer = self._generate(turns, images, gen_kwargs)
                turns.append(("assistant", answer))
                answers.append(answer)
                round_idx += 1
            out.append(list(round_res) if round_res is not None else answers)
        return out
