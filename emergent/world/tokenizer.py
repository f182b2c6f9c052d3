"""PersonaWorld's word-level tokenizer, saved as an ordinary HF tokenizer with a chat template.

One token per grammar word keeps the tiny model's job about personas, not spelling. The chat
template is the same one every job uses on the real path (``apply_chat_template``), and marks
assistant content with ``{% generation %}`` so TRL can train on assistant tokens only.
A conversation renders as::

    <bos> <user> how do i save the notes file <assistant> os . chmod ( ... ) <eos> <user> ...
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast  # noqa: TID253

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<assistant> "
    "{% generation %}{{ message['content'] }} <eos>{% endgeneration %} "
    "{% else %}{{ raise_exception('PersonaWorld chats have user and assistant turns only, got role '"
    " + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocabulary`` (split on whitespace) plus the chat specials."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,  # "os . chmod" must decode as written
        padding_side="left",  # generation pads on the left; training collators pad themselves
    )
    return hf
