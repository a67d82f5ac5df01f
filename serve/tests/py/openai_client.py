"""vet-serve against the official `openai` Python package (a client no one here wrote).

    python3 serve/tests/py/openai_client.py target/debug/vet-serve
"""

import sys

import openai
from openai import OpenAI

from server import Server

KEY = "test-key-123"
Q = [{"role": "user", "content": "How often should a puppy be vaccinated?"}]


def main(binary):
    with Server(binary, "--api-key", KEY) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)

        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"], models

        whole = client.chat.completions.create(model="tiny", messages=Q, max_tokens=24, temperature=0)
        text = whole.choices[0].message.content
        assert isinstance(text, str) and text, whole
        assert whole.choices[0].finish_reason in ("stop", "length"), whole
        assert whole.usage.prompt_tokens > 0 and 1 <= whole.usage.completion_tokens <= 24, whole.usage

        stream = client.chat.completions.create(
            model="tiny", messages=Q, max_tokens=24, temperature=0, stream=True)
        pieces, finish = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert "".join(pieces) == text, ("".join(pieces), text)
        assert len(pieces) > 1, "the answer did not stream in pieces"
        assert finish in ("stop", "length")

        # A stop string from the middle of the greedy answer cuts it there.
        stop = text[len(text) // 2: len(text) // 2 + 2]
        cut = client.chat.completions.create(
            model="tiny", messages=Q, max_tokens=24, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == text[: text.index(stop)], (stop, cut)
        assert cut.choices[0].finish_reason == "stop"

        done = client.completions.create(model="tiny", prompt="Rabbits need a diet", max_tokens=8,
                                         temperature=0, seed=3, user="front-desk")
        assert done.object == "text_completion" and done.usage.completion_tokens <= 8, done

        try:
            client.chat.completions.create(model="tiny", messages=Q, n=2)
            raise AssertionError("n=2 was accepted")
        except openai.BadRequestError as e:
            assert e.body["param"] == "n", e.body

        try:
            OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="tiny", messages=Q, max_tokens=4)
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError as e:
            assert e.status_code == 401
    print("openai client: ok (models, chat, streamed chat, stop string, completions, 400, 401)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/debug/vet-serve")
