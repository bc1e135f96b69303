"""
Runs vLLM engine jobs for tests/test_vllm*.py, one after the other in one process, inside the vLLM environment
(tests/vllm/make_env.sh): `python jobs.py JOBS.json RESULTS.json`. A job names a model folder and rounds of requests
(images by name, videos as `.npy` frame arrays with their frame rate); its result holds each request's greedy tokens,
placeholder count and, with `logprobs`, its first step's log-probs; the images the vision tower encoded after each
round; with `record_positions`, the positions the LLM got for each round's prompts; the image features of
`features_input` (a torch file of processor outputs); the answers to `chat` messages; and the load error, if the
engine refused the folder. A job with `tensor_parallel_size` 2 runs its engine on two CPU ranks, one core each; it
comes last, since it sets the engine's thread binding for the process.
"""

import json
import os
import sys
import traceback


# Small KV cache (vLLM claims ~16 GB by default on CPU); the engine in this process, so `apply_model` reaches it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def count_encoded_images(model) -> None:
    """Wraps the vision tower's forward to count the images (Qwen: images and videos) it encodes."""
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.visual
    forward = tower.forward
    model.encoded_images = 0

    def counted(pixel_values, *args, **kwargs):
        grid = kwargs.get("grid_thw")  # Qwen: packed patches, one grid row per item
        model.encoded_images += len(grid) if grid is not None else pixel_values.shape[0]
        return forward(pixel_values, *args, **kwargs)

    tower.forward = counted


def encoded_images(model) -> int:
    return model.encoded_images


def record_positions(model) -> None:
    """Wraps the model's forward to keep the positions of every step (the LLM's M-RoPE positions for Qwen)."""
    forward = model.forward
    model.recorded_positions = []

    def recorded(input_ids, positions, *args, **kwargs):
        model.recorded_positions.append(positions.detach().cpu().clone())
        return forward(input_ids, positions, *args, **kwargs)

    model.forward = recorded


def take_positions(model) -> list:
    """The positions recorded since the last call, one `(3, tokens)` tensor per step, then forgets them."""
    positions, model.recorded_positions = model.recorded_positions, []
    return positions


def prefill_positions(steps: list, computed: list[int]) -> list:
    """
    Each prompt's prefill positions `(3, computed)`: the first steps' tokens, split by prompt (scheduling order); a
    prompt's computed tokens are those after its prefix-cache hit.
    """
    import torch

    prefill = torch.cat(steps, dim=-1)[..., : sum(computed)]
    return [chunk.tolist() for chunk in torch.split(prefill, computed, dim=-1)]


def image_features(path: str):
    """`embed_multimodal` of the processor outputs saved at `path`, as a list of `(tokens, hidden)` CPU tensors."""
    import torch

    def run(model):
        inputs = torch.load(path)
        with torch.no_grad():
            return [features.cpu() for features in model.embed_multimodal(**inputs)]

    return run


def request(entry: dict, images: dict, videos: dict):
    prompt = {"prompt": entry["prompt"]}
    media = {"image": [images[name] for name in entry.get("images", [])]}
    media["video"] = [videos[name] for name in entry.get("videos", [])]
    if any(media.values()):
        prompt["multi_modal_data"] = {modality: items for modality, items in media.items() if items}
    if entry.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = entry["mm_processor_kwargs"]
    return prompt


def run(job: dict) -> dict:
    """One engine: load `job["model"]`, run the job's rounds, chat and features; or report why it did not load."""
    import numpy
    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    images = {name: Image.open(path).convert("RGB") for name, path in job.get("images", {}).items()}
    videos = {}
    for name, video in job.get("videos", {}).items():
        frames = numpy.load(video["path"])
        metadata = {
            "fps": video["fps"],
            "total_num_frames": len(frames),
            "frames_indices": list(range(len(frames))),
            "duration": len(frames) / video["fps"],
            "video_backend": "opencv",
        }
        videos[name] = (frames, metadata)
    result: dict = {"rounds": []}
    tensor_parallel_size = job.get("tensor_parallel_size", 1)
    if tensor_parallel_size > 1:  # one OpenMP thread per rank, bound to its own core (vllm-notes: CPU TP)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(tensor_parallel_size))
        os.environ["VLLM_HOST_IP"] = "127.0.0.1"
    try:
        engine = {
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 2048,
            "seed": 0,
            "enable_prefix_caching": False,
            "limit_mm_per_prompt": job.get("limit_mm_per_prompt", {"image": 2}),
            "tensor_parallel_size": tensor_parallel_size,
            **job.get("engine", {}),
        }
        llm = LLM(model=job["model"], trust_remote_code=True, **engine)
    except Exception as error:  # the test reads the message
        traceback.print_exc()
        result["load_error"] = f"{type(error).__name__}: {error}"
        for cause in (error.__cause__, error.__context__):
            if cause is not None:
                result["load_error"] += f" | {type(cause).__name__}: {cause}"
        return result
    params = SamplingParams(temperature=0, max_tokens=job.get("max_tokens", 8), logprobs=job.get("logprobs"))
    if job.get("count_encoder"):
        llm.apply_model(count_encoded_images)
    if job.get("record_positions"):
        llm.apply_model(record_positions)
    for entries in job.get("rounds", []):
        outputs = llm.generate([request(entry, images, videos) for entry in entries], params, use_tqdm=False)
        placeholder_ids = job.get("placeholder_ids") or [job["image_token_id"]]
        round_result = {
            "tokens": [list(output.outputs[0].token_ids) for output in outputs],
            "placeholders": [
                sum(output.prompt_token_ids.count(token) for token in placeholder_ids) for output in outputs
            ],
            "prompt_ids": [list(output.prompt_token_ids) for output in outputs],
            "encoded_images": llm.apply_model(encoded_images)[0] if job.get("count_encoder") else None,
        }
        if job.get("logprobs"):
            round_result["logprobs"] = [
                {str(token): entry.logprob for token, entry in output.outputs[0].logprobs[0].items()}
                for output in outputs
            ]
        if job.get("record_positions"):
            steps = llm.apply_model(take_positions)[0]
            computed = [len(output.prompt_token_ids) - (output.num_cached_tokens or 0) for output in outputs]
            round_result["positions"] = prefill_positions(steps, computed)
        result["rounds"].append(round_result)
    if job.get("messages"):  # OpenAI-style chats, as given
        outputs = llm.chat(job["messages"], params, use_tqdm=False)
        result["chat"] = [list(output.outputs[0].token_ids) for output in outputs]
        result["chat_prompt_tokens"] = [len(output.prompt_token_ids) for output in outputs]
    if job.get("chat"):
        messages = [
            {
                "role": "user",
                "content": [
                    *({"type": "image_pil", "image_pil": images[name]} for name in entry["images"]),
                    {"type": "text", "text": entry["text"]},
                ],
            }
            for entry in job["chat"]
        ]
        outputs = llm.chat([[message] for message in messages], params, use_tqdm=False)
        result["chat"] = [list(output.outputs[0].token_ids) for output in outputs]
        result["chat_prompt_tokens"] = [len(output.prompt_token_ids) for output in outputs]
    if job.get("features_input"):
        features = llm.apply_model(image_features(job["features_input"]))[0]
        torch.save(features, job["features_output"])
    del llm
    return result


def main(jobs_path: str, result_path: str) -> None:
    """Runs the jobs of `jobs_path` (a JSON list) one after the other in this process: one import of vLLM for all."""
    from vllm.distributed import cleanup_dist_env_and_memory

    with open(jobs_path) as file:
        jobs = json.load(file)
    results = []
    for job in jobs:
        results.append(run(job))
        cleanup_dist_env_and_memory()
    with open(result_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
