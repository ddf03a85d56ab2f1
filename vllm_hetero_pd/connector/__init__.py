"""HeteroNixlConnector: the only package that imports vLLM's connector API.

``vllm_hetero_pd.connector`` is also a valid ``kv_connector_module_path``; the class is
imported lazily so that resolving the module does not pull in torch or NIXL.
"""


def __getattr__(name: str):
    if name == "HeteroNixlConnector":
        from vllm_hetero_pd.connector.connector import HeteroNixlConnector

        return HeteroNixlConnector
    raise AttributeError(name)
