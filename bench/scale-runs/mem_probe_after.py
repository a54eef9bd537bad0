"""Probe: RSS per device of what each emulated device's inference and receiver hold on one SharedModel."""
import gc
import sys
from pathlib import Path

from devices.update_receiver import UpdateReceiver, UpdateTrust
from server.data import device_test_split, load_dataset_arrival
from server.models import build_model
from testbed.core.scenario import load_scenario
from testbed.core.signing import SigningKey
from testbed.inference import SharedModel


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


count = int(sys.argv[1])
scenario = load_scenario(Path("scenarios/lowband.yaml"))
arrival = load_dataset_arrival(scenario.data, 7)
shared = SharedModel(build_model(scenario.model, arrival.num_features, arrival.num_classes, 7,
                                 input_shape=arrival.input_shape))
trust = UpdateTrust("r", SigningKey.generate().trusted_key)
gc.collect()
before = rss_mib()
kept = []
for index in range(count):
    inference = shared.for_device(device_test_split(arrival.test, index, 50, 7))
    receiver = UpdateReceiver(inference.initial_weights(), 7, trust)
    inference.load_weights(receiver.weights)
    inference.accuracy()
    kept.append((inference, receiver))
gc.collect()
print(f"{count} devices: {(rss_mib() - before) / count * 1024:.1f} KiB/device")
