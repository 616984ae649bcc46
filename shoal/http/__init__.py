"""HTTP adapters: Starlette apps over the domain objects in ``shoal.head`` and ``shoal.scheduler``.

``head``       the head's REST API, dashboard and API docs
``scheduler``  the scheduler's OIP REST routes, health, metrics (composes the others)
``openai``     the OpenAI-compatible ``/v1`` API
``generate``   Triton's generate extension (``/v2/models/NAME/generate[_stream]``)
``sse``        server-sent events
``auth``       token and role middleware (over ``shoal.auth``)
``server``     uvicorn on a socket bound by shoal, so port 0 works

The gRPC adapters are the same layer in ``shoal.rpc``; neither ``shoal.head`` nor
``shoal.scheduler`` imports Starlette or grpc.
"""
