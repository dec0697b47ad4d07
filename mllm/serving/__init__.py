"""`mllm serve`: a MultimodalLM behind the OpenAI chat completions API, with a chat page.

One job per module: `protocol` (the API's request checks, responses and error shape), `images` (an
`image_url` part to a PIL image: data URIs, or local files under a declared root), `prompt` (messages to
prompt ids and images, as `mllm chat` builds them), `engine` (one worker thread that batches the requests
arriving together and streams every row's text), `app` (the FastAPI routes and the chat page) and
`server` (load a model, bind, run uvicorn).

FastAPI and uvicorn are the optional `serve` extra (`pip install 'mllm[serve]'`): only `app` and
`server` import them, and only `mllm serve` imports those.
"""
