"""Parses Prometheus exposition text with the official Python client's parsers and prints one
JSON object: {file: {family: {"type", "help", "samples": [{"name", "labels", "value"}]}}}.
A file ending in `.om` is OpenMetrics (`prometheus_client.openmetrics.parser`), any other the
Prometheus text format (`prometheus_client.parser.text_string_to_metric_families`).

Usage: prom_parse.py FILE...
"""
import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families


def parse(text, openmetrics):
    families = {}
    parser = openmetrics_families if openmetrics else text_string_to_metric_families
    for family in parser(text):
        if family.name in families:
            raise SystemExit(f"family {family.name} appears twice")
        families[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples
            ],
        }
    return families


def main():
    out = {}
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            out[path] = parse(f.read(), path.endswith(".om"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
