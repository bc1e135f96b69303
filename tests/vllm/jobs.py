"""
Runs vLLM engine jobs for tests/test_vllm.py, one after the other in one process, inside the vLLM environment
(tests/vllm/make_env.sh): `python jobs.py JOBS.json RESULTS.json`. A job names a model folder and rounds of requests;
its result holds each request's greedy tokens and placeholder count, the images the vision tower encoded after each
round, the image features of `features_input` (a torch file of processor outputs) and the load error, if the engine
refused the folder. A job with `tensor_parallel_size` 2 runs its engine on two CPU ranks, one core each; it comes
last, since it sets the engine's thread binding for the process.
"""

import json
import os
import sys
import traceback


# Small KV cache (vLLM claims ~16 GB by default on CPU); the engine in this process, so `apply_model` reaches it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def count_encoded_images(model) -> None:
    """Wraps the vision tower's forward to count the images it encodes."""
    tower = model.vision_tower
    forward = tower.forward
    model.encoded_images = 0

    def counted(pixel_values, *args, **kwargs):
        model.encoded_images += pixel_values.shape[0]
        return forward(pixel_values, *args, **kwargs)

    tower.forward = counted


def encoded_images(model) -> int:
    return model.encoded_images


def image_features(path: str):
    """`embed_multimodal` of the processor outputs saved at `path`, as a list of `(tokens, hidden)` CPU tensors."""
    import torch

    def run(model):
        inputs = torch.load(path)
        with torch.no_grad():
            return [features.cpu() for features in model.embed_multimodal(**inputs)]

    return run


def request(entry: dict, images: dict):
    prompt = {"prompt": entry["prompt"]}
    if entry.get("images"):
        prompt["multi_modal_data"] = {"image": [images[name] for name in entry["images"]]}
    if entry.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = entry["mm_processor_kwargs"]
    return prompt


def run(job: dict) -> dict:
    """One engine: load `job["model"]`, run the job's rounds, chat and features; or report why it did not load."""
    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    images = {name: Image.open(path).convert("RGB") for name, path in job.get("images", {}).items()}
    result: dict = {"rounds": []}
    tensor_parallel_size = job.get("tensor_parallel_size", 1)
    if tensor_parallel_size > 1:  # one OpenMP thread per rank, bound to its own core (vllm-notes: CPU TP)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(tensor_parallel_size))
        os.environ["VLLM_HOST_IP"] = "127.0.0.1"
    try:
        llm = LLM(
            model=job["model"],
            trust_remote_code=True,
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            seed=0,
            enable_prefix_caching=False,
            limit_mm_per_prompt={"image": 2},
            tensor_parallel_size=tensor_parallel_size,
        )
    except Exception as error:  # the test reads the message
        traceback.print_exc()
        result["load_error"] = f"{type(error).__name__}: {error}"
        for cause in (error.__cause__, error.__context__):
            if cause is not None:
                result["load_error"] += f" | {type(cause).__name__}: {cause}"
        return result
    params = SamplingParams(temperature=0, max_tokens=job.get("max_tokens", 8))
    if job.get("count_encoder"):
        llm.apply_model(count_encoded_images)
    for entries in job.get("rounds", []):
        outputs = llm.generate([request(entry, images) for entry in entries], params, use_tqdm=False)
        result["rounds"].append(
            {
                "tokens": [list(output.outputs[0].token_ids) for output in outputs],
                "placeholders": [output.prompt_token_ids.count(job["image_token_id"]) for output in outputs],
                "encoded_images": llm.apply_model(encoded_images)[0] if job.get("count_encoder") else None,
            }
        )
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
