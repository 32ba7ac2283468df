"""An official SDK, with its default `max_retries`, making many calls at once through the
forward proxy in front of a provider stand-in that refuses what exceeds its limit.

Run by tests/proxy_sdks.rs:

    many_calls.py SDK CALLS EXPECT

with PROXY set to the proxy's base URL. SDK is `openai` or `anthropic`; CALLS calls run at
once, every other one streamed. EXPECT is `ok` (every call must succeed without the SDK
retrying: the proxy waited for capacity and said `x-should-retry: false`) or `refused`
(every call must fail with the proxy's answer; how many requests reached the proxy is the
test's to check). Prints one line per call and a summary; exits non-zero when a call did
not end as expected.
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

TEXT = "Hello from the stand-in"
MESSAGES = [{"role": "user", "content": "hi"}]


def openai_call(client, stream):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=MESSAGES, stream=stream
    )
    reply = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    else:
        text = reply.choices[0].message.content
    return raw, text


def anthropic_call(client, stream):
    raw = client.messages.with_raw_response.create(
        model="claude-test", max_tokens=16, messages=MESSAGES, stream=stream
    )
    reply = raw.parse()
    if stream:
        text = "".join(
            e.delta.text for e in reply if e.type == "content_block_delta" and e.delta.type == "text_delta"
        )
    else:
        text = reply.content[0].text
    return raw, text


def make(sdk):
    proxy = os.environ["PROXY"]
    if sdk == "openai":
        from openai import APIStatusError, OpenAI

        # Default max_retries (2): what users run.
        return OpenAI(api_key="client-side-dummy", base_url=proxy + "/v1"), openai_call, APIStatusError
    if sdk == "anthropic":
        import anthropic

        client = anthropic.Anthropic(api_key="client-side-dummy", base_url=proxy)
        return client, anthropic_call, anthropic.APIStatusError
    raise SystemExit(f"unknown SDK {sdk}")


def main():
    sdk, calls, expect = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    client, call, status_error = make(sdk)
    started = time.monotonic()

    def one(i):
        stream = i % 2 == 1
        kind = "stream" if stream else "plain"
        try:
            raw, text = call(client, stream)
        except status_error as err:
            headers = err.response.headers
            return (
                f"{i} {kind} status={err.status_code}"
                f" x-should-retry={headers.get('x-should-retry')}"
                f" retry-after={headers.get('retry-after')}"
                f" retry-after-ms={headers.get('retry-after-ms')}"
                f" after={time.monotonic() - started:.2f}s",
                expect == "refused",
            )
        good = text == TEXT and raw.retries_taken == 0
        return (
            f"{i} {kind} status={raw.status_code} retries_taken={raw.retries_taken}"
            f" x-should-retry={raw.headers.get('x-should-retry')} text={text!r}"
            f" after={time.monotonic() - started:.2f}s",
            expect == "ok" and good,
        )

    with ThreadPoolExecutor(max_workers=calls) as pool:
        results = list(pool.map(one, range(calls)))
    for line, good in results:
        print(("ok " if good else "FAIL ") + line)
    failed = sum(1 for _, good in results if not good)
    print(f"{sdk}: {calls - failed}/{calls} as expected ({expect}) in {time.monotonic() - started:.2f}s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
