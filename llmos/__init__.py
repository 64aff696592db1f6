"""``llmos``: use a workbench from code, in this process or over HTTP (see ``llmos.client``).

import llmos
model = llmos.Client().load_model("smollm2-135m")                   # in this process
model = llmos.Client("http://host:8501", api_key="...").load_model("smollm2-135m")
model.generate_text("The capital of France is", max_new_tokens=8, greedy=True).text
"""

from llmos.client import Client, Job, Model, RemoteError

__all__ = ["Client", "Job", "Model", "RemoteError"]
