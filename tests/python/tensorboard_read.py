"""Reads a directory of TensorBoard event files with TensorBoard's own loader and prints every
scalar series as JSON: {"tag": [[step, value], ...], ...}, in the order TensorBoard keeps them
(orphaned steps of a restarted run purged, as TensorBoard shows them)."""
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator, SCALARS)


def main(directory):
    accumulator = EventAccumulator(directory, size_guidance={SCALARS: 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags()["scalars"]:
        series[tag] = [[e.step, None if math.isnan(e.value) else e.value]
                       for e in accumulator.Scalars(tag)]
    print(json.dumps(series, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
