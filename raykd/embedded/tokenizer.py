"""A byte-level BPE tokenizer trained locally on the built-in tasks, saved as an ordinary HF tokenizer folder.

Built like Qwen2's: a regex split (single digits, words, punctuation runs, whitespace) then byte-level BPE, so
any text encodes and decodes losslessly. Trained on the tasks' own text, every word and number of the tasks
ends up one token. ``<think>``/``</think>`` and the ChatML markers are single special tokens; the chat
template is ChatML, and generation ends at ``<|im_end|>``.
"""

from __future__ import annotations

from pathlib import Path

from raykd.files import atomic_folder
from raykd.problems.tasks import TASKS, THINK_CLOSE, THINK_OPEN, make_problems, reference_completion

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]

# Like GPT-2/Qwen2, a leading space stays with its word; unlike GPT-2, digits are split one by one (as Qwen2
# does) so every number the tasks print uses the same ten digit tokens.
SPLIT_PATTERN = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def training_corpus(n_per_task: int = 200) -> list[str]:
    """Chat-formatted texts of both built-in tasks (fixed seed: the same tokenizer on every machine)."""
    texts = []
    for task in TASKS:
        for problem in make_problems(task, "train", n_per_task, seed=0):
            texts.append(f"user\n{problem.prompt}\nassistant\n{reference_completion(problem)}")
    # Numbers in any knob setting use these; make sure each has its spaced and unspaced form.
    texts.append(" ".join("0123456789") + " " + "".join("0123456789") + " -1 -2")
    return texts


def build_tokenizer(out_dir: str | Path) -> Path:
    """Train the tokenizer and save it (``tokenizer.json`` + config) to ``out_dir``, written atomically.

    Load it back with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # vocab_size is a ceiling: training stops once every word of the corpus is a single token.
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, THINK_OPEN, THINK_CLOSE],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return _save_atomically(fast, out_dir)


def _save_atomically(fast: object, out_dir: Path) -> Path:
    with atomic_folder(out_dir) as tmp:
        fast.save_pretrained(tmp)  # type: ignore[attr-defined]
    return out_dir
