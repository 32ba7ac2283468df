"""The official Python SDKs (openai, anthropic, zhipuai) against the forward proxy.

Run by tests/proxy_sdks.rs with OPENAI_PROXY, ANTHROPIC_PROXY and BIGMODEL_PROXY set to the
proxies' base URLs, each in front of the test's provider stand-in. Each SDK makes a plain
call and a streamed one; the script prints one line per check and exits non-zero on the
first failure. The keys the SDKs hold are the client's own (dummies): the proxy replaces
them with its own.
"""

import os
import sys


def check(name, got, expected):
    if got != expected:
        print(f"FAIL {name}: got {got!r}, expected {expected!r}")
        sys.exit(1)
    print(f"ok {name}")


def openai_sdk():
    from openai import OpenAI

    client = OpenAI(api_key="client-side-dummy", base_url=os.environ["OPENAI_PROXY"] + "/v1")
    reply = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    check("openai plain", reply.choices[0].message.content, "Hello from the stand-in")
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    check("openai stream", text, "Hello from the stand-in")


def anthropic_sdk():
    import anthropic

    client = anthropic.Anthropic(api_key="client-side-dummy", base_url=os.environ["ANTHROPIC_PROXY"])
    message = client.messages.create(
        model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    check("anthropic plain", message.content[0].text, "Hello from the stand-in")
    with client.messages.stream(
        model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
    check("anthropic stream", text, "Hello from the stand-in")


def zhipuai_sdk():
    from zhipuai import ZhipuAI

    # The SDK signs a token from an `id.secret` key: any such dummy does.
    client = ZhipuAI(api_key="client.dummy", base_url=os.environ["BIGMODEL_PROXY"] + "/api/paas/v4")
    reply = client.chat.completions.create(
        model="glm-test", messages=[{"role": "user", "content": "hi"}]
    )
    check("zhipuai plain", reply.choices[0].message.content, "Hello from the stand-in")
    stream = client.chat.completions.create(
        model="glm-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    check("zhipuai stream", text, "Hello from the stand-in")


if __name__ == "__main__":
    for sdk in (openai_sdk, anthropic_sdk, zhipuai_sdk):
        sdk()
