"""One condition, one answer: every key rests past the wait budget; two calls one after
the other through the forward proxy must fail with the same exception type, the SDK's
rate-limit error, whether the provider's own 429 came back (the first call) or the proxy
answered without asking it (the second). Neither is retried by the SDK.

Run by tests/sdks.rs:

    same_error.py SDK

with PROXY set to the proxy's base URL; SDK is `openai` or `anthropic`. Prints one line
per call; exits non-zero unless both raised the SDK's RateLimitError with
`x-should-retry: false`.
"""

import os
import sys

MESSAGES = [{"role": "user", "content": "hi"}]


def main():
    sdk = sys.argv[1]
    proxy = os.environ["PROXY"]
    if sdk == "openai":
        import openai

        client = openai.OpenAI(api_key="client-side-dummy", base_url=proxy + "/v1")
        rate_limited = openai.RateLimitError

        def call():
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    elif sdk == "anthropic":
        import anthropic

        client = anthropic.Anthropic(api_key="client-side-dummy", base_url=proxy)
        rate_limited = anthropic.RateLimitError

        def call():
            client.messages.create(model="claude-test", max_tokens=16, messages=MESSAGES)

    else:
        raise SystemExit(f"unknown SDK {sdk}")

    kinds = []
    for i in range(2):
        try:
            call()
            print(f"{i} succeeded")
            kinds.append(None)
        except Exception as err:  # noqa: BLE001 - the type is what is checked
            response = getattr(err, "response", None)
            headers = response.headers if response is not None else {}
            print(
                f"{i} {type(err).__name__} status={getattr(err, 'status_code', None)}"
                f" x-should-retry={headers.get('x-should-retry')}"
                f" retry-after={headers.get('retry-after')}"
            )
            good = isinstance(err, rate_limited) and headers.get("x-should-retry") == "false"
            kinds.append(type(err).__name__ if good else None)
    same = kinds[0] is not None and kinds[0] == kinds[1]
    print(f"{sdk}: {'same' if same else 'DIFFERENT'} {kinds}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
