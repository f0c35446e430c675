"""Templated prompt tasks with a known answer and known attributes: the shared input of circuit
discovery (framework/circuits.py: positive / negative prompts) and of supervised-dictionary
evaluation (framework/supervised.py: attribute values per prompt).

Each generator returns pairs (positive, negative) of the same template with the same token
count (every filler word is one token with its leading space, checked by `check_pairs`): the
model can infer the positive's answer from its context, not the negative's, and the pairing is
what activation patching swaps. Task files (JSON) hold the same thing:

    {"name": "ioi", "positive": [{"prompt", "answer", "distractor", "attributes"}, ...],
     "negative": [...same fields, paired by index with "positive"...]}

`python -m framework.templates ioi --n 60 --seed 0 > configs/tasks/ioi.json` writes one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from framework.errors import ConfigError
from framework.registry import Registry


@dataclass
class Example:
    prompt: str
    answer: str  # the next token the prompt asks for (with its leading space)
    distractor: str  # the competing token of the logit difference answer - distractor
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class Task:
    name: str
    positive: list[Example]
    negative: list[Example]  # negative[i] is positive[i]'s corrupted twin

    def to_json(self) -> dict:
        return {"name": self.name, "positive": [asdict(e) for e in self.positive],
                "negative": [asdict(e) for e in self.negative]}


TASKS: Registry[Callable[[int, int], Task]] = Registry("task template")

NAMES = [" Mary", " John", " Tom", " James", " Sarah", " Anna", " David", " Michael", " Emma", " Paul", " Lisa",
         " Peter", " Mark", " Alice", " Bob", " Jack", " Daniel"]
PLACES = [" store", " park", " school", " market", " beach", " office", " garden", " station"]
OBJECTS = [" drink", " book", " ball", " letter", " ring", " gift", " key", " bag"]
IOI_TEMPLATES = [
    "When{A} and{B} went to the{place},{S} gave a{obj} to",
    "After{A} and{B} arrived at the{place},{S} handed a{obj} to",
    "Then,{A} and{B} had a long day at the{place}, and{S} gave a{obj} to",
    "While{A} and{B} were walking to the{place},{S} passed a{obj} to",
]


@TASKS.register("ioi")
def ioi(n: int, seed: int) -> Task:
    """Indirect object identification. Positive: names A, B, then the subject S repeats one of
    them; the answer is the other (the indirect object). Attributes: `io` and `s` (names), `order`
    (ABB: the IO is named first; BAB: second), `template`. Negative: S is a third name (ABC), so
    nothing in the context tells which of A, B receives the object."""
    rng = random.Random(seed)
    pos, neg = [], []
    for i in range(n):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        io, s, c = rng.sample(NAMES, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        order = "ABB" if i % 2 == 0 else "BAB"
        a, b = (io, s) if order == "ABB" else (s, io)
        attrs = {"io": io.strip(), "s": s.strip(), "order": order, "template": str(IOI_TEMPLATES.index(template))}
        pos.append(Example(template.format(A=a, B=b, S=s, place=place, obj=obj), io, s, attrs))
        neg.append(Example(template.format(A=a, B=b, S=c, place=place, obj=obj), io, s, {**attrs, "s": c.strip()}))
    return Task("ioi", pos, neg)


ARG_NAMES = [" alpha", " beta", " gamma", " delta", " name", " value", " key", " size", " data", " path", " mode",
             " file", " count", " index", " items", " target", " source", " config", " user", " text"]
FUNCTION_NAMES = ["load", "update", "process", "compute", "render", "parse", "check", "build"]
DESCRIPTIONS = ["Load the records.", "Update the state.", "Process one batch.", "Compute the total.",
                "Render the page.", "Parse the input.", "Check the values.", "Build the index."]
WORDS = [" the", " a", " new", " old", " first", " last", " main", " small"]


@TASKS.register("docstring")
def docstring(n: int, seed: int) -> Task:
    """Docstring argument completion (Heimersheim & Janiak): a function with three arguments
    whose docstring has documented the first two; the next `:param` names the third. Negative:
    the signature's argument names are replaced by others (the docstring is unchanged), so the
    answer is no longer in the context; the distractor is the replaced third name."""
    rng = random.Random(seed)
    pos, neg = [], []
    for i in range(n):
        a, b, c, a2, b2, c2 = rng.sample(ARG_NAMES, 6)
        fn, desc = FUNCTION_NAMES[i % len(FUNCTION_NAMES)], DESCRIPTIONS[i % len(DESCRIPTIONS)]
        w1, w2 = rng.choice(WORDS), rng.choice(WORDS)

        def prompt(x, y, z):
            return (f"def {fn}(self,{x},{y},{z}):\n    \"\"\"{desc}\n\n    :param{a}:{w1} thing\n"
                    f"    :param{b}:{w2} thing\n    :param")

        attrs = {"arg": c.strip()}
        pos.append(Example(prompt(a, b, c), c, c2, attrs))
        neg.append(Example(prompt(a2, b2, c2), c, c2, {"arg": c2.strip()}))
    return Task("docstring", pos, neg)


# --------------------------------------------------------------------------- task files

EXAMPLE_FIELDS = ("prompt", "answer", "distractor")


def load_task(path: str | Path) -> Task:
    """A task file, checked field by field (the error names the file and the entry)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file not found: '{path}'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"task file '{path}': not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"task file '{path}': the top level must be an object with 'positive' and 'negative'")
    for side in ("positive", "negative"):
        if not isinstance(data.get(side), list) or not data[side]:
            raise ConfigError(f"task file '{path}': '{side}' must be a non-empty list of examples")
    sides = {}
    for side in ("positive", "negative"):
        examples = []
        for i, item in enumerate(data[side]):
            where = f"task file '{path}': {side}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{where}: expected an object with {list(EXAMPLE_FIELDS)}")
            missing = [f for f in EXAMPLE_FIELDS if not isinstance(item.get(f), str) or not item.get(f)]
            if missing:
                raise ConfigError(f"{where}: missing or empty field(s) {missing}")
            unknown = sorted(set(item) - set(EXAMPLE_FIELDS) - {"attributes"})
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {list(EXAMPLE_FIELDS) + ['attributes']}")
            attrs = item.get("attributes", {})
            if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
                raise ConfigError(f"{where}.attributes: must map attribute names to string values")
            examples.append(Example(item["prompt"], item["answer"], item["distractor"], dict(attrs)))
        sides[side] = examples
    return Task(str(data.get("name", path.stem)), sides["positive"], sides["negative"])


def single_token(tokenizer, text: str, where: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"{where}: '{text}' is {len(ids)} tokens for this tokenizer; answers and distractors must be "
                          "one token (with the leading space)")
    return ids[0]


def check_pairs(task: Task, tokenizer) -> None:
    """Patching swaps activations position by position: each negative must tokenise to as
    many tokens as its positive."""
    if len(task.negative) != len(task.positive):
        raise ConfigError(f"task '{task.name}': {len(task.positive)} positive but {len(task.negative)} negative "
                          "examples; patching pairs them by index")
    for i, (p, q) in enumerate(zip(task.positive, task.negative)):
        lp, lq = (len(tokenizer.encode(e.prompt, add_special_tokens=False)) for e in (p, q))
        if lp != lq:
            raise ConfigError(f"task '{task.name}': positive[{i}] is {lp} tokens but negative[{i}] is {lq}; paired "
                              "prompts must have the same token count")


@dataclass
class PromptBatch:
    """Prompts as one right-padded token batch: BOS + prompt tokens; `last` is each row's final
    real position (where the answer is predicted). Right padding leaves every real position's
    causal computation as without padding."""

    ids: torch.Tensor  # [n, T]
    mask: torch.Tensor  # [n, T] 1 = real token
    last: torch.Tensor  # [n]
    answer: torch.Tensor  # [n] token ids
    distractor: torch.Tensor  # [n]

    def logit_diff(self, final: torch.Tensor) -> torch.Tensor:
        """answer - distractor logit from each row's final-position logits [n, vocab]: [n]."""
        return logit_diff(final, self.answer, self.distractor)


def logit_diff(final: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """final[i, a[i]] - final[i, b[i]]: [n]."""
    final = final.float()
    return (final.gather(1, a[:, None].to(final.device)) - final.gather(1, b[:, None].to(final.device))).squeeze(1)


def final_logits(model, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Next-token logits at each row's `last` position: [n, vocab]. The LM head runs only at the
    distinct last positions (`logits_to_keep`), not at every position (on SmolLM2 the 49k-token
    head is ~12% of a forward at every position)."""
    device = next(model.parameters()).device
    keep, which = last.unique(return_inverse=True)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                   logits_to_keep=keep.to(device)).logits
    return logits[torch.arange(ids.shape[0], device=logits.device), which.to(logits.device)]


def encode(examples: list[Example], tokenizer, where: str = "task") -> PromptBatch:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer.encode(e.prompt, add_special_tokens=False) for e in examples]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    answer = torch.tensor([single_token(tokenizer, e.answer, f"{where}[{i}].answer") for i, e in enumerate(examples)])
    distractor = torch.tensor([single_token(tokenizer, e.distractor, f"{where}[{i}].distractor")
                               for i, e in enumerate(examples)])
    return PromptBatch(ids, mask, torch.tensor([len(r) - 1 for r in rows]), answer, distractor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m framework.templates", description="Write a task file (JSON).")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--n", type=int, default=60, help="pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    json.dump(TASKS[args.task](args.n, args.seed).to_json(), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
