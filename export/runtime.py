"""Run an exported folder with ONNX Runtime alone: what an edge device carries (onnxruntime, numpy and
tokenizers; no torch, no transformers, no tyrsearch). `tyrsearch export` copies this file into the
folder, so on the device:

    python runtime.py FOLDER --prompt "The river" --max-new-tokens 32 [--model-file model.int8.onnx]

Greedy decoding. A decoder graph (past_key_values.* inputs) runs one token per step with its KV cache; a
prefill-only graph reruns the whole sequence each step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


class Decoder:
    """Greedy generation with one ONNX Runtime session of an exported graph."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past = [name for name in self.inputs if name.startswith("past_key_values.")]
        self.presents = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        self.dtype = np.float16 if any("float16" in self.inputs[n].type for n in self.past) else np.float32

    @classmethod
    def load(cls, path: str | Path, *, threads: int = 0) -> Decoder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
        return cls(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] of a whole sequence (an empty past for a decoder graph)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": np.ones_like(input_ids, dtype=np.int64)}
        if self.past:
            batch, seq = input_ids.shape
            feeds.update(self._empty_past(batch), position_ids=np.broadcast_to(np.arange(seq), (batch, seq)).copy())
        return self.session.run(["logits"], feeds)[0]

    def greedy(self, input_ids: np.ndarray, new_tokens: int, *, eos_token_id: int | None = None) -> list[int]:
        """The next `new_tokens` token ids after `input_ids` [1, n] (stops early at eos_token_id if given)."""
        ids = input_ids.astype(np.int64)
        out: list[int] = []
        if not self.past:
            for _ in range(new_tokens):
                logits = self.session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
                token = int(logits[0, -1].argmax())
                out.append(token)
                if token == eos_token_id:
                    break
                ids = np.concatenate([ids, [[token]]], axis=1)
            return out
        feeds = self._empty_past(ids.shape[0])
        step_ids, seen = ids, 0
        for _ in range(new_tokens):
            length = step_ids.shape[1]
            feeds.update({"input_ids": step_ids, "attention_mask": np.ones((1, seen + length), dtype=np.int64),
                          "position_ids": np.arange(seen, seen + length, dtype=np.int64)[None]})
            logits, *present = self.session.run(["logits", *self.presents], feeds)
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == eos_token_id:
                break
            feeds.update(zip(self.past, present, strict=True))  # present.{i} becomes past_key_values.{i}
            seen, step_ids = seen + length, np.array([[token]], dtype=np.int64)
        return out

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past for each layer: [batch, kv_heads_i, 0, head_dim] (the heads are fixed per layer)."""
        feeds = {}
        for name in self.past:
            _, heads, _, dim = self.inputs[name].shape
            feeds[name] = np.zeros((batch, heads, 0, dim), dtype=self.dtype)
        return feeds


def main(argv: list[str] | None = None) -> int:
    from tokenizers import Tokenizer

    parser = argparse.ArgumentParser(description="Generate text with an exported tyrsearch folder (ONNX Runtime).")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model-file", default="model.onnx", help="the graph in FOLDER (e.g. model.int8.onnx)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (prompt ids, new ids, text)")
    args = parser.parse_args(argv)
    path = args.folder / args.model_file
    if not path.is_file() or not (args.folder / "tokenizer.json").is_file():
        print(f"error: {args.folder} has no {args.model_file} or tokenizer.json; give a folder written by "
              "`tyrsearch export`", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(str(args.folder / "tokenizer.json"))
    config = json.loads((args.folder / "config.json").read_text())
    prompt = np.array([tokenizer.encode(args.prompt, add_special_tokens=False).ids], dtype=np.int64)
    new = Decoder.load(path).greedy(prompt, args.max_new_tokens, eos_token_id=config.get("eos_token_id"))
    text = tokenizer.decode(new)
    if args.json:
        print(json.dumps({"prompt_ids": prompt[0].tolist(), "new_ids": new, "text": text}))
    else:
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
