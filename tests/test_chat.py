"""Chat templates: rendered as transformers renders them, in a sandbox that no template can leave."""

from __future__ import annotations

import json

import pytest

from onebox.chat import ChatTemplate, TemplateError, load_chat_template
from onebox.errors import OneboxError

transformers = pytest.importorskip("transformers")

# Constructs real templates use (Llama 3, Mistral, Qwen, Gemma styles): a namespace carried through a loop,
# raise_exception on a bad role order, strftime_now, tojson, loop controls, whitespace control and special tokens.
LLAMA_STYLE = (
    "{{- bos_token }}{%- set date = strftime_now('%d %b %Y') %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday: {{ date | length > 0 }}\n{{ system }}<|eot_id|>"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)
QWEN_STYLE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}\n"
    "  {%- if loop.index0 > 5 %}{% break %}{% endif %}\n"
    "<|im_start|>{{ message.role }}\n{{ message.content }}{% if loop.index0 == ns.last_user %} (last){% endif %}<|im_end|>\n"
    "{%- endfor %}\n"
    "{{ {'n': messages | length, 'é': 'ü<>'} | tojson }}\n"
    "{%- if add_generation_prompt %}\n<|im_start|>assistant\n{%- endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": "Who's there? <b>"},
    {"role": "assistant", "content": "Nay, answer me."},
    {"role": "user", "content": "Long live the king!"},
]


def _hf_render(template: str, messages, corpus_dir) -> str:
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(corpus_dir / "tokenizer.json"), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [LLAMA_STYLE, QWEN_STYLE], ids=["llama-style", "qwen-style"])
def test_templates_render_as_transformers_renders_them(template, corpus_dir):
    ours = ChatTemplate(template, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}).render(MESSAGES)
    assert ours == _hf_render(template, MESSAGES, corpus_dir) and "Who's there? <b>" in ours


def test_raise_exception_in_a_template_is_a_clear_refusal():
    template = ChatTemplate(LLAMA_STYLE, {"bos_token": "<s>"})
    with pytest.raises(TemplateError, match="roles must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ joiner.__init__.__globals__['os'].popen('touch MARKER').read() }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ self.__init__.__globals__ }}",
    ],
)
def test_a_hostile_template_runs_no_code(hostile, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError):
        ChatTemplate(hostile).render(MESSAGES)
    assert not (tmp_path / "MARKER").exists()


def test_the_folders_template_and_special_tokens_are_found(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"},
                    {"name": "tool_use", "template": "x"},
                ],
                "bos_token": {"content": "<s>", "lstrip": False},
            }
        )
    )
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "hi"}]) == "<s>hi"
    (tmp_path / "chat_template.jinja").write_text("[{{ messages | length }}]")
    assert load_chat_template(tmp_path).render(MESSAGES) == "[4]"
    assert load_chat_template(tmp_path / "missing") is None
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(OneboxError, match="does not parse"):
        load_chat_template(tmp_path)
