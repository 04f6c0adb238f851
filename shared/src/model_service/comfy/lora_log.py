"""ComfyUI's own word that a LoRA did not apply, read from its log while a prompt runs.

ComfyUI 0.33 runs a prompt whose LoRA does not fit without it and only logs:

- `lora key not loaded: <tensor>`: a LoRA tensor that matches no weight (comfy/lora.py
  `load_lora`);
- `ERROR lora <weight> shape '[..]' is invalid for input of size N` and the like: a patch
  that failed (comfy/weight_adapter/*.py `calculate_weight`: "ERROR {name} {key} {e}", name
  lora, loha, lokr, glora, oft or boft);
- `WARNING SHAPE MISMATCH <weight> WEIGHT NOT MERGED ...` (comfy/lora.py
  `calculate_weight`, a `diff` patch) and `NOT LOADED <weight>` (comfy/sd.py
  `load_lora_for_models`: a patch for a weight the model does not have).

ComfyUI prints each as `[LEVEL] message` (app/logger.py `ColoredFormatter`; the supervisor
has taken the colours off). Which prompt a line belongs to: ComfyUI runs one prompt at a
time and logs `Prompt executed in ...` after each (main.py `prompt_worker`), all on one
stream. A watch begins before its prompt is queued (a prompt ahead of it may still be
running); until its own prompt starts, each such line ends another prompt, so what came
before it is dropped; after its start the first such line ends its own. Lines still unread
when the job's result is in are missed; LoRA lines come at model load, long before a
prompt's end.

`lora key not loaded` lines name the LoRA tensor, so a watch given the job's own LoRA
tensor names (`lora_keys`) counts only those: the service's built-in LoRAs (e.g. the
4-step pair) share the prompt, and a stray tensor of theirs is not the caller's fault.
"""

from __future__ import annotations

import re

_LEVEL = r"^(?:\[[A-Z]+\] )?"  # "[WARNING] ", or nothing (a plain logging setup)
PROBLEM = re.compile(
    _LEVEL + r"(?:lora key not loaded: |ERROR (?:lora|loha|lokr|glora|oft|boft) \S+ |"
    r"WARNING SHAPE MISMATCH |NOT LOADED )"
)
NOT_LOADED_KEY = re.compile(_LEVEL + r"lora key not loaded: (\S+)")
PROMPT_ENDED = re.compile(_LEVEL + r"Prompt executed in ")
MAX_KEPT = 20


class LoraLogWatch:
    """Feed it ComfyUI's lines (`__call__`); `started()` when its prompt starts; `lines`
    are the LoRA problems ComfyUI logged for that prompt (the first `MAX_KEPT`)."""

    def __init__(self, lora_keys: frozenset[str] | None = None) -> None:
        self.lora_keys = lora_keys
        self.lines: list[str] = []
        self.count = 0
        self._started = False
        self._ended = False

    def started(self) -> None:
        self._started = True

    def __call__(self, line: str) -> None:
        if self._ended:
            return
        if PROMPT_ENDED.match(line):
            if self._started:
                self._ended = True
            else:  # a prompt ahead of ours ended: its lines are not ours
                self.lines.clear()
                self.count = 0
        elif PROBLEM.match(line) and self._ours(line):
            self.count += 1
            if len(self.lines) < MAX_KEPT:
                self.lines.append(line)

    def _ours(self, line: str) -> bool:
        unloaded = NOT_LOADED_KEY.match(line)
        return unloaded is None or self.lora_keys is None or unloaded[1] in self.lora_keys
