"""Make the model and adapters `make test-vllm` serves, once, into the cache.

Run by scripts/install_vllm_cpu.sh with the vLLM venv's Python (torch,
transformers, gguf, peft):

    python scripts/make_vllm_models.py GGUF ROOT

writes ``ROOT/smollm2-hf/`` (SmolLM2-135M-Instruct dequantized from the cached
GGUF, bfloat16 safetensors, tokenizer with its chat template) and ``ROOT/lora/a``,
``ROOT/lora/b``: PEFT LoRA adapters (r=8 on q_proj and v_proj) with seeded random
weights and no training, large enough to change the greedy answer. Each folder is
written beside its final place and renamed, so a half-made one is never reused.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ADAPTERS = {"a": 1, "b": 2}
PROMPT = "Name a colour."


def make_base(gguf: Path, out: Path) -> None:
    if (out / "config.json").exists():
        return
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model is marked quantized and refuses save_pretrained: a fresh
    # model from the same config, without quantization_config, takes its weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not AutoTokenizer.from_pretrained(tmp).chat_template:
        raise SystemExit("the tokenizer lost its chat template")
    tmp.rename(out)
    print(f"SmolLM2 (Hugging Face folder): {out}")


def greedy(model: torch.nn.Module, tok: object) -> str:
    ids = tok.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)  # type: ignore[operator]
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))  # type: ignore[attr-defined]


def make_adapter(base: Path, tmp: Path, seed: int) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        # False: A and B both random (the default zeroes B, a no-op adapter)
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft = get_peft_model(model, config)
    peft.save_pretrained(tmp)


def check_answers_differ(base: Path, adapters: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(base)
    answers = {"base": greedy(AutoModelForCausalLM.from_pretrained(base), tok)}
    for name, folder in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(base)
        answers[name] = greedy(PeftModel.from_pretrained(model, folder), tok)
    print("greedy answers:", answers)
    if len(set(answers.values())) != len(answers):
        raise SystemExit(f"the adapters do not change the greedy answer: {answers}")


def main() -> None:
    gguf, root = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(2)
    base = root / "smollm2-hf"
    lora = root / "lora"
    lora.mkdir(parents=True, exist_ok=True)
    make_base(gguf, base)
    if all((lora / name / "adapter_config.json").exists() for name in ADAPTERS):
        return
    parts = {name: lora / f"{name}.part" for name in ADAPTERS}
    for name, seed in ADAPTERS.items():
        make_adapter(base, parts[name], seed)
    check_answers_differ(base, parts)
    for name, part in parts.items():
        shutil.rmtree(lora / name, ignore_errors=True)
        part.rename(lora / name)
        print(f"LoRA adapter (PEFT, seed {ADAPTERS[name]}): {lora / name}")


if __name__ == "__main__":
    main()
