"""Python hooks for general_mc_fewshot.yaml, loaded as lm-eval loads them (``!function utils.NAME``).

tunelab (like lm-eval) imports this file and runs it when it reads the task: only point a suite at
task folders whose code you trust.
"""


def process_docs(dataset):
    """lm-eval passes a datasets.Dataset per split; return one. Here: number the choices A-D."""
    letters = "ABCD"

    def add(doc):
        return {"options": "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(doc["choices"])),
                "letters": list(letters[: len(doc["choices"])])}

    return dataset.map(add)
