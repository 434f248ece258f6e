"""Named prompt templates applied to a prompt's text as it is read (`data.prompt_template`).

A template wraps the prepared prompt (problem + instruction) in a model's chat format. They exist for
the recipes that reproduce a paper whose data loader applied a fixed template of its own, so the text
the engine sees is exactly the paper's; other runs format prompts at preparation time
(`examples/data_preprocess/prepare.py --chat-template`). Leaf module: no imports from the package.
"""

from __future__ import annotations

# JSPO-Official's `qwen-math` (code/verl/utils/dataset/rl_dataset.py, `chat_template_dict`), rendered
# for one user message as transformers renders it: note the space before each <|im_end|>; of the two
# newlines after "assistant" in the source, jinja drops the final one (keep_trailing_newline is off).
QWEN_MATH = ("<|im_start|>system\nPlease reason step by step and put the final answer in \\boxed{}. <|im_end|>\n"
             "<|im_start|>user\n{prompt} <|im_end|>\n<|im_start|>assistant\n")

PROMPT_TEMPLATES: dict[str, str] = {"qwen-math": QWEN_MATH}


def apply_template(name: str, prompt: str) -> str:
    """`prompt` wrapped in the template `name`; "" returns it unchanged."""
    if not name:
        return prompt
    if name not in PROMPT_TEMPLATES:
        raise KeyError(f"data.prompt_template={name!r} is not a known template "
                       f"({', '.join(sorted(PROMPT_TEMPLATES))}): use one of those or \"\"")
    return PROMPT_TEMPLATES[name].replace("{prompt}", prompt)
