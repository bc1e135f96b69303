# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The `visiontrim` model type of lmms-eval (registered through the `lmms_eval.models` entry point):

    python -m lmms_eval --model visiontrim --model_args pretrained=PATH,visual_tokens=64 --tasks pope --batch_size 1

It loads any VisionTrim folder (LLaVA family, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL or Qwen3-VL; `reduction_ratio=R`
overrides a folder's budget as `visual_tokens=K` does a LLaVA or OneVision one's) or a stock one with
`trust_remote_code=True`. The prompt goes through the processor's chat template, which extracts the question,
instructions included, as TGVC's guidance text. Its errors are raised, never turned into empty answers; lmms-eval 0.7.3
itself logs an error raised during an evaluation and exits with status 0 unless given `--verbosity DEBUG`, so check
that the results file was written (see the README).
"""

import inspect

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


IMAGE_TOKEN = "<image>"


def manifest() -> ModelManifest:
    """The entry point lmms-eval reads: model id `visiontrim`, implemented by `VisionTrimLmms`."""
    return ModelManifest(model_id="visiontrim", simple_class_path=f"{__name__}.VisionTrimLmms")


class VisionTrimLmms(lmms):
    """lmms-eval model wrapping a VisionTrim (or stock LLaVA) folder; one request at a time, greedy by default."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        visual_tokens: int | str | None = None,
        reduction_ratio: float | str | None = None,
        max_new_tokens: int | str = 128,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            accepted = [name for name in inspect.signature(VisionTrimLmms.__init__).parameters if name != "self"]
            raise ValueError(
                f"visiontrim: unknown model_args {sorted(kwargs)}; it accepts {', '.join(accepted[:-1])}."
            )
        overrides = {"visual_tokens": int(visual_tokens)} if visual_tokens else {}
        if reduction_ratio is not None:
            overrides["reduction_ratio"] = float(reduction_ratio)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, trust_remote_code=True, dtype=torch_dtype, **overrides
        ).to(self.device)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True, **overrides)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _inputs(self, context: str, images: list[Image.Image], continuation: str = ""):
        """
        Processor inputs of `context` in the chat format, its images first where it places none: as `<image>` text
        for LLaVA processors, as image parts of the message for processors with other placeholders (Qwen's template
        wraps each in its vision start and end tokens).
        """
        content = []
        if images and self.processor.image_token not in context:
            if self.processor.image_token == IMAGE_TOKEN:
                context = " ".join([IMAGE_TOKEN] * len(images)) + "\n" + context
            else:
                content = [{"type": "image"}] * len(images)
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": [*content, {"type": "text", "text": context}]}], add_generation_prompt=True
        )
        inputs = self.processor(images=images or None, text=prompt + continuation, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _images(self, doc_to_visual, doc_id, task: str, split: str) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [visual.convert("RGB") for visual in visuals if isinstance(visual, Image.Image)]

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            context, generation_kwargs, doc_to_visual, doc_id, task, split = request.args
            settings = dict(generation_kwargs or {})
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else until
            temperature = float(settings.pop("temperature", 0) or 0)
            inputs = self._inputs(context, self._images(doc_to_visual, doc_id, task, split))
            prompt_length = inputs["input_ids"].shape[1]
            generated = self.model.generate(
                **inputs,
                max_new_tokens=int(settings.pop("max_new_tokens", self.max_new_tokens)),
                do_sample=temperature > 0,
                **({"temperature": temperature} if temperature > 0 else {}),
                num_beams=int(settings.pop("num_beams", 1) or 1),
            )
            text = self.processor.decode(generated[0, prompt_length:], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            inputs = self._inputs(context, self._images(doc_to_visual, doc_id, task, split), continuation)
            continuation_length = len(self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            logits = self.model(**inputs).logits[0, -continuation_length - 1 : -1].float()
            targets = inputs["input_ids"][0, -continuation_length:]
            log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
            results.append((log_probs.sum().item(), bool((logits.argmax(dim=-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("visiontrim: multi-round generation is not supported; use single-round tasks.")
