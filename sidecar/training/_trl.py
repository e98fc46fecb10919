"""A real trainer for the ``command`` hook: TRL's DPO, KTO and SFT trainers on a peft LoRA.

``atlas-sidecar train --data D --out O --base V`` (see :mod:`sidecar.training._train_cli`).
torch, transformers, TRL and peft are imported inside the functions here, only by
that command: the daemon never imports them. They come from the ``trl`` extra
(``make trl-env`` builds a venv with it).

Models folder (``--models-dir``, ``$ATLAS_MODELS_DIR`` or ``models_dir`` in the
config file), one folder per version:

- a root version is a Hugging Face model folder (``config.json``, safetensors,
  tokenizer), e.g. written by ``atlas-sidecar model import-gguf``;
- a trained version holds ``adapter/`` (the PEFT LoRA), ``adapter.gguf`` (the same
  LoRA for llama-server) and ``version.json`` (its root and parent).

A run on a trained base version *continues* that version's LoRA (loaded trainable)
rather than merging it into the weights: llama-server serves every version as one
base GGUF plus one LoRA file, so a merged model would need a new 270 MB base GGUF per
version, and the rank stays fixed however many updates follow. The DPO and KTO
reference is the version trained from (TRL keeps a frozen copy of the adapter it is
given as its ``ref`` adapter; a fresh LoRA starts at zero, so for a root version the
reference is the base model): each update moves a bounded step from what is served.

Methods: DPO on ``preferences.jsonl`` (TRL's ``sigmoid`` loss plus, by default, its
``sft`` loss on the chosen answer, weight ``dpo_sft_weight``), KTO on ``kto.jsonl``,
SFT on ``sft.jsonl`` (loss on the completion only). ``auto`` takes the first of them
with at least ``min_rows`` training rows.

The new version is ``<root>-<update id>`` (the hook's ``$ATLAS_UPDATE_ID``), or
``<root>-t<N>`` run by hand; its folder is created atomically and never written over.
``candidate.json`` goes to the output folder last, written whole: a run that fails or
is stopped (SIGTERM) leaves none, and removes the version folder it claimed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.training._trl_data import Rows, Settings, choose_method, load_rows

__all__ = ["Terminated", "import_gguf", "train"]

VERSION_FILE = "version.json"


class Terminated(BaseException):
    """SIGTERM arrived: the run stops without a candidate."""


def log(msg: str) -> None:
    print(f"[trainer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    def _raise(_signum: int, _frame: object) -> None:
        raise Terminated

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def default_converter() -> Path | None:
    cache = Path(os.environ.get("ATLAS_SIDECAR_CACHE", Path.home() / ".cache" / "atlas-sidecar"))
    found = sorted(cache.glob("llama-server-*/convert_lora_to_gguf.py"))
    return found[-1] if found else None


# -- import ------------------------------------------------------------------------


def import_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """A GGUF model (dequantized) as the Hugging Face folder training starts from.

    transformers' loaded GGUF model is marked quantized and refuses to save: the
    weights go into a fresh model built from the same config. Written to a sibling
    folder and renamed, so ``out`` is complete or absent.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.exists():
        raise FileExistsError(f"{out} exists; not writing over it")
    started = time.monotonic()
    torch.set_num_threads(2)
    log(f"loading {gguf} (dequantizing)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied output head has no tensor of its own in the GGUF.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the config: missing {missing}, extra {unexpected}")
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    log(f"saving to {out}")
    model.save_pretrained(str(part))
    tok.save_pretrained(str(part))
    info = {
        "source_gguf": str(gguf.resolve()),
        "architecture": type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "seconds": round(time.monotonic() - started, 1),
    }
    (part / VERSION_FILE).write_text(json.dumps({"root": True, **info}, indent=1))
    part.rename(out)
    log(f"imported in {info['seconds']} s: {info['parameters']} parameters")
    return info


# -- training ----------------------------------------------------------------------


@dataclass
class Base:
    version: str
    root: str
    hf_dir: Path
    adapter: Path | None


def resolve_base(models: Path, version: str) -> Base:
    folder = models / version
    if (folder / "config.json").exists():
        return Base(version, version, folder, None)
    meta_path = folder / VERSION_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no model for base version {version!r} in {models} (expected a Hugging Face "
            f"folder or a trained version with {VERSION_FILE})"
        )
    meta = json.loads(meta_path.read_text())
    return Base(version, meta["root"], models / meta["root"], folder / "adapter")


def claim_version(models: Path, root: str) -> tuple[str, Path]:
    update = os.environ.get("ATLAS_UPDATE_ID", "")
    if update:
        name = f"{root}-{update}"
        folder = models / name
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            raise ValueError(f"version {name} exists in {models}; not writing over it") from None
        return name, folder
    n = 1
    while True:
        name = f"{root}-t{n}"
        try:
            (models / name).mkdir(parents=True)
            return name, models / name
        except FileExistsError:
            n += 1


def _chat(tok: Any, prompt: str) -> str:
    """The prompt as the served model sees it: its chat template, one user turn."""
    text: str = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text


def completion_logps(
    model: Any, tok: Any, items: list[tuple[str, str]], max_length: int
) -> list[tuple[float, int]]:
    """Sum of log-probabilities of each completion given its prompt, and its token count."""
    import torch

    out: list[tuple[float, int]] = []
    model.eval()
    with torch.no_grad():
        for prompt, completion in items:
            p_ids = tok(_chat(tok, prompt), add_special_tokens=False)["input_ids"]
            c_ids = tok(completion + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
            ids = (p_ids + c_ids)[:max_length]
            n_prompt = min(len(p_ids), len(ids) - 1)
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = x[0, 1:]
            tok_logp = logp.gather(1, target[:, None])[:, 0][n_prompt - 1 :]
            out.append((float(tok_logp.sum()), int(tok_logp.numel())))
    return out


def holdout_loss(model: Any, tok: Any, rows: list[dict[str, Any]], max_length: int) -> float:
    """Mean per-token negative log-likelihood of the held-out completions."""
    res = completion_logps(model, tok, [(r["prompt"], r["completion"]) for r in rows], max_length)
    total = sum(n for _lp, n in res)
    return -sum(lp for lp, _n in res) / total if total else float("nan")


def pair_logps(
    model: Any, tok: Any, pairs: list[dict[str, Any]], max_length: int
) -> tuple[list[float], list[float]]:
    """Log-probabilities of each pair's chosen and rejected answer."""
    items = [(p["prompt"], p["chosen"]) for p in pairs] + [
        (p["prompt"], p["rejected"]) for p in pairs
    ]
    lps = [lp for lp, _n in completion_logps(model, tok, items, max_length)]
    return lps[: len(pairs)], lps[len(pairs) :]


def preference_metrics(
    policy: tuple[list[float], list[float]], ref: tuple[list[float], list[float]], beta: float
) -> dict[str, float]:
    """DPO's implicit reward on held-out pairs, as TRL logs it in training:
    beta * (log pi - log pi_ref), chosen against rejected, with the model before the
    run as the reference. ``prefers_chosen``: the share of pairs whose chosen answer the
    policy finds more likely than the rejected one (no reference)."""
    (pc, pr), (rc, rr) = policy, ref
    n = len(pc)
    if not n:
        return {}
    margins = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(n)]
    return {
        "reward_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "prefers_chosen": sum(pc[i] > pr[i] for i in range(n)) / n,
    }


def _progress_callback(total_steps: int) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.losses: list[float] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:
                return
            self.losses.append(float(logs["loss"]))
            step = state.global_step
            elapsed = time.monotonic() - self.started
            left = elapsed / step * (total_steps - step) if step else float("nan")
            extra = "".join(
                f" {k.split('/')[-1] if '/' in k else k} {float(v):.3f}"
                for k, v in logs.items()
                if k in ("rewards/accuracies", "rewards/margins", "kl")
            )
            log(
                f"step {step}/{total_steps} loss {float(logs['loss']):.4f}{extra} "
                f"elapsed {elapsed:.0f} s, about {left:.0f} s left"
            )

    return Progress()


def _dataset_for(method: str, rows: Rows, tok: Any) -> Any:
    from datasets import Dataset

    def chat(p: str) -> str:
        return _chat(tok, p)

    if method == "dpo":
        data = [
            {"prompt": chat(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows.pairs
        ]
    elif method == "kto":
        data = [
            {"prompt": chat(r["prompt"]), "completion": r["completion"], "label": r["label"]}
            for r in rows.kto
        ]
    else:
        data = [{"prompt": chat(r["prompt"]), "completion": r["completion"]} for r in rows.sft]
    return Dataset.from_list(data)


def _trainer(
    method: str, model: Any, tok: Any, dataset: Any, s: Settings, work: Path, peft_config: Any
) -> Any:
    common: dict[str, Any] = {
        "output_dir": str(work),
        "max_steps": s.steps,
        "per_device_train_batch_size": s.batch_size,
        "learning_rate": s.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": s.seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
    }
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        losses: dict[str, list[Any]] = {"loss_type": ["sigmoid"]}
        if s.dpo_sft_weight > 0:
            losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, s.dpo_sft_weight]}
        args = DPOConfig(**common, **losses, beta=s.beta, max_length=s.max_length)
        return DPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft_config,
        )
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common, beta=s.beta, max_length=s.max_length)
        return KTOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft_config,
        )
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common, max_length=s.max_length, completion_only_loss=True)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
    )


def convert_to_gguf(converter: Path, hf_dir: Path, adapter: Path, out: Path) -> None:
    """llama.cpp's converter, run by this interpreter (it needs torch)."""
    log(f"converting the adapter to GGUF with {converter}")
    proc = subprocess.run(
        [
            *(sys.executable, str(converter), "--base", str(hf_dir), "--outtype", "f16"),
            *("--outfile", str(out), str(adapter)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError("convert_lora_to_gguf.py failed: " + " | ".join(tail))


def train(data: Path, out: Path, base_version: str, method: str, s: Settings) -> dict[str, Any]:
    """One run; returns the candidate document it wrote to ``out/candidate.json``.

    Raises:
        DatasetError, ThinDataError: the snapshot is malformed or too thin.
        FileNotFoundError: no model for the base version.
        Terminated: SIGTERM (nothing is left behind but the log).
    """
    started = time.monotonic()
    if not s.models_dir:
        raise ValueError("no models folder: --models-dir, $ATLAS_MODELS_DIR or models_dir")
    models = Path(s.models_dir)
    rows = load_rows(data, holdout_share=s.holdout_share)
    method = choose_method(rows, method, s.min_rows)
    base = resolve_base(models, base_version)
    log(
        f"{method.upper()} on {base.version} (root {base.root}): "
        + ", ".join(f"{k} {v}" for k, v in rows.counts.items())
    )
    converter = Path(s.gguf_converter) if s.gguf_converter else default_converter()

    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    tok = AutoTokenizer.from_pretrained(str(base.hf_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base.hf_dir), dtype=torch.float32)
    peft_config = None
    if base.adapter is not None:
        # Continued: TRL copies it as the frozen reference adapter.
        model = PeftModel.from_pretrained(model, str(base.adapter), is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=s.lora_r,
            lora_alpha=s.lora_alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        )
    log(f"model loaded in {time.monotonic() - started:.0f} s")

    before_loss = holdout_loss(model, tok, rows.held_sft, s.max_length)
    ref_logps = pair_logps(model, tok, rows.held_pairs, s.max_length)
    before_pref = preference_metrics(ref_logps, ref_logps, s.beta)

    version, folder = claim_version(models, base.root)
    try:
        work = out / "work"
        dataset = _dataset_for(method, rows, tok)
        trainer = _trainer(method, model, tok, dataset, s, work, peft_config)
        progress = _progress_callback(s.steps)
        # One progress line per step (ours) instead of transformers' raw log dicts.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(progress)
        t0 = time.monotonic()
        result = trainer.train()
        train_seconds = time.monotonic() - t0
        model = trainer.model
        after_loss = holdout_loss(model, tok, rows.held_sft, s.max_length)
        after_pref = preference_metrics(
            pair_logps(model, tok, rows.held_pairs, s.max_length), ref_logps, s.beta
        )

        # Only the trained adapter: not the frozen "ref" copy TRL added beside it.
        model.save_pretrained(str(folder / "adapter"), selected_adapters=["default"])
        artifact = folder / "adapter"
        if converter is not None and converter.exists():
            convert_to_gguf(converter, base.hf_dir, folder / "adapter", folder / "adapter.gguf")
            artifact = folder / "adapter.gguf"
        else:
            log("no convert_lora_to_gguf.py: the PEFT folder is the artifact")
        shutil.rmtree(work, ignore_errors=True)

        metrics: dict[str, float] = {
            f"method_{method}": 1.0,
            "steps": float(result.global_step),
            "train_loss": float(result.training_loss),
            "train_loss_first": progress.losses[0] if progress.losses else float("nan"),
            "train_loss_last": progress.losses[-1] if progress.losses else float("nan"),
            "train_seconds": round(train_seconds, 1),
            "run_seconds": round(time.monotonic() - started, 1),
            **{k: float(v) for k, v in rows.counts.items()},
        }
        if rows.held_sft:
            metrics |= {
                "holdout_loss_before": before_loss,
                "holdout_loss_after": after_loss,
                "forgetting": after_loss - before_loss,
            }
        if "prefers_chosen" in before_pref:  # the reward margin before is 0 by construction
            metrics["prefers_chosen_before"] = before_pref["prefers_chosen"]
        metrics |= after_pref
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        (folder / VERSION_FILE).write_text(
            json.dumps(
                {
                    "root": base.root,
                    "parent": base.version,
                    "method": method,
                    "dataset_dir": str(data.resolve()),
                    "metrics": metrics,
                },
                indent=1,
            )
        )
        doc = {"version": version, "artifact_uri": artifact.resolve().as_uri(), "metrics": metrics}
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "candidate.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, out / "candidate.json")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out / "work", ignore_errors=True)
        raise
    log(
        f"trained {version}: loss {metrics['train_loss_first']:.3f} -> "
        f"{metrics['train_loss_last']:.3f} in {train_seconds:.0f} s; "
        + ", ".join(
            f"{k} {metrics[k]:.3f}"
            for k in ("reward_accuracy", "reward_margin", "forgetting")
            if k in metrics
        )
    )
    return doc
