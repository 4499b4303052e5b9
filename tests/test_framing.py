"""A Hugging Face model's text framing: prompts encoded as transformers' tokenizer encodes them, chats
rendered and encoded as apply_chat_template does, generation stopped at every eos id of
generation_config.json; `onebox generate --chat` and `onebox chat` (multi-turn, /reset, /exit) on it."""

from __future__ import annotations

import json

import pytest
import torch

from onebox.cli import main
from onebox.infer.framing import load_framing, onebox_framing
from onebox.tokenizer import tokenizer_from_json

transformers = pytest.importorskip("transformers")

TEMPLATE = (
    "{{ bos_token }}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, corpus_dir):
    """A random Llama with the corpus tokenizer plus chat tokens, a template, a BOS post-processor (as Llama 3's
    tokenizer has) and a list of eos ids in generation_config.json."""
    from tokenizers import processors

    folder = tmp_path_factory.mktemp("chat-model")
    tok = tokenizer_from_json((corpus_dir / "tokenizer.json").read_text())
    tok.add_special_tokens(["<|begin|>", "<|im_start|>", "<|im_end|>"])
    begin = tok.token_to_id("<|begin|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", begin)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|endoftext|>", chat_template=TEMPLATE
    )
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    end = tok.token_to_id("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, 7]}))
    return folder, fast


def test_prompts_and_chats_are_encoded_as_transformers_does_and_every_eos_stops(chat_folder):
    folder, fast = chat_folder
    framing = load_framing(folder, tokenizer_from_json((folder / "tokenizer.json").read_text()))
    text = "To be, or not to be"
    assert framing.encode(text) == fast(text)["input_ids"]  # the post-processor's <|begin|> first, as transformers
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    text = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert framing.render(messages) == text
    encoded = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert framing.encode_chat(messages) == list(encoded["input_ids"])
    end, eos = fast.convert_tokens_to_ids("<|im_end|>"), fast.convert_tokens_to_ids("<|endoftext|>")
    assert framing.stops == (end, 7, eos)  # generation_config.json's list, then the tokenizer's eos
    assert framing.stop_strings(chat=True) == []  # the template ends turns with a token, not text


def test_onebox_models_keep_their_own_framing(corpus_tokenizer, tmp_path):
    framing = load_framing(tmp_path / "no-such-run", corpus_tokenizer)
    eos = corpus_tokenizer.token_to_id("<|endoftext|>")
    assert framing.start == [eos] and framing.stops == (eos,) and framing == onebox_framing(corpus_tokenizer)
    assert framing.encode_chat([{"role": "user", "content": "hi"}])[:1] == [eos]
    assert framing.stop_strings(chat=True)


def test_generate_chat_and_the_chat_session(chat_folder, capsys, monkeypatch):
    folder, _ = chat_folder
    args = ["--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["generate", str(folder), "--prompt", "Who art thou?", "--chat", *args]) == 0
    reply = capsys.readouterr().out.strip()
    lines = iter(["Who art thou?", "/reset", "Who art thou?", "And then?", "/exit"])
    seen = []

    def fake_input(prompt=""):
        seen.append(prompt)
        return next(lines)

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(folder), *args]) == 0
    out = capsys.readouterr().out
    answers = [line.removeprefix("model> ").strip() for line in out.splitlines() if line.startswith("model> ")]
    assert len(answers) == 3 and seen == ["you> "] * 5
    assert answers[0] == answers[1] == reply  # greedy, and /reset forgot the first exchange
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    assert main(["chat", str(folder), *args]) == 0  # Ctrl-D ends it


def test_a_long_conversation_keeps_the_system_message_and_drops_the_oldest_turns():
    from onebox.cli.chat import fit
    from onebox.errors import OneboxError

    def encode(messages):
        return [0] * sum(len(m["content"]) for m in messages)

    messages = [{"role": "system", "content": "s" * 10}]
    for _ in range(4):
        messages += [{"role": "user", "content": "u" * 20}, {"role": "assistant", "content": "a" * 20}]
    messages.append({"role": "user", "content": "q" * 20})
    ids = fit(messages, encode, 75)
    assert len(ids) <= 75 and messages[0]["role"] == "system" and messages[-1]["content"] == "q" * 20
    assert len(messages) == 4  # system, one exchange, the question
    with pytest.raises(OneboxError, match="write a shorter one"):
        fit([{"role": "user", "content": "x" * 100}], encode, 50)


def test_the_server_frames_a_hugging_face_models_chat_as_generate_does(chat_folder):
    """POST /v1/chat/completions on an HF folder: the prompt is its template's, the reply stops at its eos ids,
    and greedy output equals generate() on the same framing."""
    import httpx
    from conftest import running_app

    from onebox.infer.engine import Engine
    from onebox.infer.generate import generate, load_model
    from onebox.serve import Server, create_app

    folder, _ = chat_folder
    model, tokenizer = load_model(folder)
    framing = load_framing(folder, tokenizer)
    messages = [{"role": "user", "content": "Who art thou?"}]
    prompt = framing.encode_chat(messages)
    want = generate(model, prompt, 8, temperature=0, stop_ids=framing.stops)
    engine = Engine(model, max_batch=2, compile=False).start()
    try:
        server = Server(engine, tokenizer, "chat", framing=framing)
        assert server.framing.stops == framing.stops
        with running_app(create_app(server)) as url:
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "chat", "messages": messages, "max_tokens": 8, "temperature": 0},
                timeout=30,
            ).json()
        assert answer["usage"]["prompt_tokens"] == len(prompt)
        assert answer["choices"][0]["message"]["content"] == framing.decode(want.samples[0])
    finally:
        engine.stop()
