"""What the experiments write when they finish: their results as JSON and their report."""

import json
import os


def write_results(out_dir, name, result, text):
    """
    Write <name>.json (the result, for other tools to read) and <name>.md (the report) into
    out_dir, creating it, and print the report.

    :param result: the JSON-serialisable measurements.
    :param text: the markdown report of them.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
