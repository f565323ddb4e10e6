"""The bundled model's server: llama-cpp-python's OpenAI-compatible server
(same arguments as `python -m llama_cpp.server`), with a model list that
answers at once.

Its own GET /v1/models takes the lock that completions hold for the whole of
an answer, so with requests taking turns (`--interrupt_requests False`) a new
tab would wait for someone else's reply to end before it saw the model list;
the list comes from the settings, so it needs no lock."""

import argparse
import sys
from typing import TypeVar

import uvicorn
from fastapi import Depends, FastAPI
from llama_cpp.server import app as llama_app
from llama_cpp.server.cli import add_args_from_model
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

MODELS_PATH = "/v1/models"

SettingsModel = TypeVar("SettingsModel", ServerSettings, ModelSettings)


def settings_from(model: type[SettingsModel], args: argparse.Namespace) -> SettingsModel:
    # What llama_cpp.server.cli.parse_model_from_args does, typed as it is
    # called (its own annotation takes an instance where it means the class).
    return model(
        **{k: v for k, v in vars(args).items() if v is not None and k in model.model_fields}
    )


async def list_models() -> dict:
    # The aliases of the configured models: reading them touches no model.
    return {
        "object": "list",
        "data": [
            {"id": alias, "object": "model", "owned_by": "me", "permissions": []}
            for alias in llama_app._llama_proxy or ()
        ],
    }


def create_app(server: ServerSettings, model: ModelSettings) -> FastAPI:
    app = llama_app.create_app(server_settings=server, model_settings=[model])
    # Routes match in order, and FastAPI keeps llama's router as one opaque
    # entry, so ours goes first rather than replacing theirs.
    app.get(MODELS_PATH, dependencies=[Depends(llama_app.authenticate)])(list_models)
    app.router.routes.insert(0, app.router.routes.pop())
    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)
    server = settings_from(ServerSettings, args)
    model = settings_from(ModelSettings, args)
    uvicorn.run(create_app(server, model), host=server.host, port=server.port)


if __name__ == "__main__":
    main(sys.argv[1:])
