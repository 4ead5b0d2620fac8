"""The Grafana dashboards of Phyllome, written as JSON into ``deploy/grafana/dashboards/``.

The JSON files are what Grafana loads (through ``provisioning/dashboards/phyllome.yml``);
this script is where they are edited, so that every panel is built the same way. After a
change::

    .venv/bin/python -m deploy.grafana.generate    # rewrites dashboards/*.json

``tests/unit/test_deploy_files.py`` fails when the JSON files and this script disagree, and
``tests/system/test_observability.py`` runs every panel's query against a real Prometheus
scraping a real stack: a panel that would show "No data" fails it. Queries use the target
labels ``host`` and ``agent`` that ``deploy/prometheus/prometheus*.yml`` set, and the
recording rules of ``deploy/prometheus/rules/phyllome-recording.yml``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "phyllome-prometheus"}
H = 'host=~"$host"'
RATE = "$__rate_interval"
RANGE = "$__range"


@dataclass
class Panel:
    title: str
    description: str  # the question the panel answers
    targets: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    instant: bool = False
    thresholds: list[tuple[float, str]] = field(default_factory=list)
    mappings: dict[str, str] = field(default_factory=dict)

    def render(self, pid: int, x: int, y: int) -> dict[str, Any]:
        steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
        steps += [{"color": color, "value": value} for value, color in self.thresholds]
        defaults: dict[str, Any] = {"unit": self.unit,
                                    "thresholds": {"mode": "absolute", "steps": steps}}
        if self.mappings:
            defaults["mappings"] = [{"type": "value", "options": {
                value: {"text": text, "index": i}
                for i, (value, text) in enumerate(self.mappings.items())}}]
        panel: dict[str, Any] = {
            "id": pid, "type": self.kind, "title": self.title,
            "description": self.description, "datasource": DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": self.width, "h": self.height},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                 "legendFormat": legend, "instant": self.instant, "range": not self.instant,
                 **({"format": "table"} if self.kind == "table" else {})}
                for i, (expr, legend) in enumerate(self.targets)],
        }
        if self.kind == "table":
            panel["transformations"] = [{"id": "merge", "options": {}}]
        return panel


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    rendered, x, y, row_height = [], 0, 0, 0
    for pid, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y, row_height = 0, y + row_height, 0
        rendered.append(p.render(pid, x, y))
        x += p.width
        row_height = max(row_height, p.height)
    return {
        "uid": uid, "title": title, "description": description, "tags": ["phyllome"],
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "timezone": "",
        "links": [{"type": "dashboards", "tags": ["phyllome"], "asDropdown": True,
                   "title": "Phyllome", "includeVars": True, "keepTime": True}],
        "templating": {"list": [{
            "name": "host", "label": "Host", "type": "query", "datasource": DATASOURCE,
            "query": {"query": 'label_values(up{job="phyllome"}, host)', "refId": "host"},
            "definition": 'label_values(up{job="phyllome"}, host)', "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1}]},
        "annotations": {"list": []},
        "panels": rendered,
    }


def stat(title: str, description: str, expr: str, unit: str = "short", width: int = 4,
         **kw: Any) -> Panel:
    return Panel(title, description, [(expr, "")], kind="stat", unit=unit, width=width,
                 height=4, instant=True, **kw)


def overview() -> dict[str, Any]:
    return dashboard("phyllome-overview", "Phyllome cluster overview",
                     "Is everything up, how busy is it, what is wrong?", [
        stat("Hosts", "How many hosts does Prometheus scrape agents of?",
             f'count(count by (host) (up{{job="phyllome", {H}}}))'),
        stat("Agents up", "How many agents answer their scrapes?",
             f'sum(up{{job="phyllome", {H}}})'),
        stat("Agents down", "How many agents do not answer? (0 is good)",
             f'count(up{{job="phyllome", {H}}} == 0) or vector(0)', thresholds=[(1, "red")]),
        stat("VMs running", "How many VMs run across the selected hosts?",
             f'sum(phyllome_vm_vms{{{H}, state="running"}})'),
        stat("Fullest pool", "How full is the fullest storage pool? (alert above 85 %)",
             f"max(phyllome:storage_pool_used:ratio{{{H}}})", unit="percentunit",
             thresholds=[(0.75, "orange"), (0.85, "red")]),
        stat("Alerts firing", "How many Phyllome alerts fire now? (0 is good)",
             'count(ALERTS{alertstate="firing", alertname=~"Phyllome.+"}) or vector(0)',
             thresholds=[(1, "red")]),
        Panel("Agents over time", "Which agents answered (up) or not (down), and when?",
              [(f'up{{job="phyllome", {H}}}', "{{host}} {{agent}}")], kind="state-timeline",
              mappings={"0": "down", "1": "up"}, thresholds=[(1, "green")]),
        Panel("VMs by state", "How many VMs are in each state?",
              [(f"sum by (state) (phyllome:vms:sum{{{H}}})", "{{state}}")]),
        Panel("Requests per second by agent", "How busy is each agent's bus endpoint set?",
              [(f"sum by (host, agent) (phyllome:requests:rate5m{{{H}}})",
                "{{host}} {{agent}}")], unit="reqps"),
        Panel("Request error ratio", "Which share of each agent's requests fails?",
              [(f"phyllome:request_errors:ratio_rate5m{{{H}}}", "{{host}} {{agent}}")],
              unit="percentunit"),
        Panel("Agent versions", "Which version does each agent run?",
              [(f'max by (host, agent, version) ({{__name__=~"phyllome_.+_build_info", {H}}})',
                "")], kind="table", instant=True),
        Panel("Agent uptime", "How long has each agent run since its last (re)start?",
              [(f'time() - {{__name__=~"phyllome_.+_start_time_seconds", {H}}}',
                "{{host}} {{agent}}")], kind="bargauge", instant=True, unit="s"),
    ])


def host() -> dict[str, Any]:
    ops = f"phyllome_hardware_operations_total{{{H}}}"
    return dashboard("phyllome-host", "Phyllome host: hardware and passthrough",
                     "What hardware does a host have, and what happened to it?", [
        Panel("PCI devices by kind", "Which PCI functions does the host have (GPUs first)?",
              [(f"sum by (host, kind) (phyllome_hardware_devices{{{H}}})", "{{host}} {{kind}}")],
              kind="bargauge", instant=True, width=8),
        Panel("GPUs", "How many GPUs could be passed through?",
              [(f'sum by (host) (phyllome_hardware_devices{{{H}, kind="gpu"}})', "{{host}}")],
              kind="stat", instant=True, width=4),
        Panel("Inventory scan time", "How long did the last full PCI scan take?",
              [(f"phyllome_hardware_scan_duration_seconds{{{H}}}", "{{host}}")],
              kind="stat", instant=True, unit="s", width=4),
        Panel("Passthrough readiness", "How many devices can be passed through alone, with "
              "their companions, only with unrelated devices, or not at all (IOMMU off)?",
              [(f"sum by (host, verdict) (phyllome_hardware_passthrough_devices{{{H}}})",
                "{{host}} {{verdict}}")], kind="bargauge", instant=True, width=8),
        Panel("Virtualization capabilities", "Does KVM really boot guests, is nested on, is "
              "the IOMMU on, and how many IOMMU groups and VFIO-bound devices are there?",
              [(f"phyllome_hardware_kvm_usable{{{H}}}", "{{host}} KVM usable"),
               (f"phyllome_hardware_nested{{{H}}}", "{{host}} nested"),
               (f"phyllome_hardware_iommu_enabled{{{H}}}", "{{host}} IOMMU on"),
               (f"phyllome_hardware_iommu_groups{{{H}}}", "{{host}} IOMMU groups"),
               (f"phyllome_hardware_vfio_bound_devices{{{H}}}", "{{host}} bound to vfio-pci")],
              kind="stat", instant=True, width=8),
        Panel("Drivers in use", "Which driver holds each kind of device (vfio-pci = ready "
              "for a guest)?", [(f"sum by (host, kind, driver) "
                                 f"(phyllome_hardware_devices_by_driver{{{H}}})",
                                 "{{host}} {{kind}} {{driver}}")],
              kind="table", instant=True, width=8),
        Panel("Passthrough operations running", "Is a bind, release or SR-IOV change "
              "running now?", [(f"phyllome_hardware_jobs_running{{{H}}}", "{{host}}")],
              kind="stat", instant=True, width=8),
        Panel("Passthrough operations by outcome", "Which bind/release/mdev/SR-IOV "
              "operations succeeded or were refused (and why), since the agent started?",
              [(f"sum by (host, verb, outcome) ({ops})",
                "{{host}} {{verb}} {{outcome}}")], kind="bargauge", instant=True),
        Panel("Kernel uevents", "Which device changes (add, remove, bind, change) did the "
              "kernel report?", [(f"sum by (host, action) (rate(phyllome_hardware_uevents_total"
                                  f"{{{H}}}[{RATE}]))", "{{host}} {{action}}")], unit="ops"),
        Panel("Inventory update time per uevent (p95)", "How fast does the inventory follow "
              "a device change?",
              [("histogram_quantile(0.95, sum by (host, le) (increase("
                f"phyllome_hardware_uevent_update_duration_seconds_bucket{{{H}}}[{RANGE}])))",
                "{{host}}")], unit="s"),
        Panel("Hardware requests", "What do clients ask the hardware agent, and does it "
              "answer?", [(f'phyllome:requests:rate5m{{{H}, agent="hardware"}}',
                           "{{host}} {{endpoint}} {{outcome}}")], unit="reqps"),
    ])


def vms() -> dict[str, Any]:
    def per_vm(metric: str) -> str:
        return f"rate({metric}{{{H}}}[{RATE}])"

    return dashboard("phyllome-vms", "Phyllome VMs",
                     "What do the VMs do, and how do their lifecycle operations go?", [
        Panel("VMs by state", "How many VMs run, are paused, shut off or crashed?",
              [(f"phyllome:vms:sum{{{H}}}", "{{host}} {{state}}")]),
        Panel("CPU per VM", "How many host cores does each VM keep busy?",
              [(f"phyllome:vm_cpu:rate5m{{{H}}}", "{{host}} {{vm}}")]),
        Panel("Memory per VM", "How much memory does each guest have, and how much host "
              "memory does its QEMU use?",
              [(f"phyllome_vm_memory_bytes{{{H}}}", "{{vm}} guest"),
               (f"phyllome_vm_memory_rss_bytes{{{H}}}", "{{vm}} host RSS")], unit="bytes"),
        Panel("Disk throughput per VM", "How many bytes does each VM read and write?",
              [(per_vm("phyllome_vm_disk_read_bytes_total"), "{{vm}} read"),
               (per_vm("phyllome_vm_disk_written_bytes_total"), "{{vm}} write")], unit="Bps"),
        Panel("Disk operations per VM", "How many read and write requests does each VM "
              "make?", [(per_vm("phyllome_vm_disk_reads_total"), "{{vm}} reads"),
                        (per_vm("phyllome_vm_disk_writes_total"), "{{vm}} writes")],
              unit="iops"),
        Panel("Network per VM", "How much does each VM receive and send?",
              [(per_vm("phyllome_vm_network_receive_bytes_total"), "{{vm}} rx"),
               (per_vm("phyllome_vm_network_transmit_bytes_total"), "{{vm}} tx")],
              unit="Bps"),
        Panel("Network packets per VM", "How many packets does each VM receive and send?",
              [(per_vm("phyllome_vm_network_receive_packets_total"), "{{vm}} rx"),
               (per_vm("phyllome_vm_network_transmit_packets_total"), "{{vm}} tx")],
              unit="pps"),
        Panel("Uptime per VM", "How long has each running VM been up since it started?",
              [(f"time() - phyllome_vm_boot_time_seconds{{{H}}}", "{{host}} {{vm}}")],
              kind="bargauge", instant=True, unit="s"),
        Panel("Lifecycle operations", "Which create/start/stop/... operations ran and how "
              "did they end, since the agent started?",
              [(f"sum by (operation, outcome) (phyllome_vm_lifecycle_operations_total{{{H}}})",
                "{{operation}} {{outcome}}")],
              kind="bargauge", instant=True),
        Panel("Lifecycle operation time (p95)", "How long do lifecycle operations take "
              "(since the agent started)?",
              [("histogram_quantile(0.95, sum by (operation, le) ("
                f"phyllome_vm_lifecycle_operation_duration_seconds_bucket{{{H}}}))",
                "{{operation}}")], kind="bargauge", instant=True, unit="s"),
        Panel("Reconciliation", "Does the agent's view drift from the hypervisor's (missed "
              "events), or does it lose libvirt (reconnects)?",
              [(f"sum by (host) (increase(phyllome_vm_reconciliations_total{{{H}}}[{RANGE}]))",
                "{{host}} passes"),
               (f"sum by (host) (increase(phyllome_vm_missed_events_total{{{H}}}[{RANGE}]))",
                "{{host}} missed events"),
               ("sum by (host) (increase(phyllome_vm_hypervisor_reconnects_total"
                f"{{{H}}}[{RANGE}]))", "{{host}} libvirt reconnects")],
              kind="stat", instant=True),
    ])


def storage() -> dict[str, Any]:
    def since_start(metric: str, by: str) -> str:
        # counters whose labels appear with their first event: increase() would miss it
        return f"sum by ({by}) ({metric}{{{H}}})"

    return dashboard("phyllome-storage", "Phyllome storage and jobs",
                     "How full are the pools, and how do clones, imports and transfers go?", [
        Panel("Pool use", "How full is each pool? (alert above 85 %)",
              [(f"phyllome:storage_pool_used:ratio{{{H}}}", "{{host}} {{pool}}")],
              kind="bargauge", instant=True, unit="percentunit",
              thresholds=[(0.75, "orange"), (0.85, "red")]),
        Panel("Pool space", "How big is each pool, how much is free, how much do its "
              "volumes hold?",
              [(f"phyllome_storage_pool_capacity_bytes{{{H}}}", "{{pool}} capacity"),
               (f"phyllome_storage_pool_free_bytes{{{H}}}", "{{pool}} free"),
               (f"phyllome_storage_pool_allocated_bytes{{{H}}}", "{{pool}} allocated")],
              unit="bytes"),
        Panel("Thin provisioning", "How much have the volumes promised (virtual size) "
              "against what they use?",
              [(f"phyllome_storage_pool_virtual_bytes{{{H}}}", "{{host}} {{pool}} virtual"),
               (f"phyllome_storage_pool_allocated_bytes{{{H}}}", "{{host}} {{pool}} allocated")],
              kind="bargauge", instant=True, unit="bytes"),
        Panel("Volumes per pool", "How many volumes does each pool hold?",
              [(f"phyllome_storage_pool_volumes{{{H}}}", "{{host}} {{pool}}")],
              kind="bargauge", instant=True),
        Panel("Clones and imports", "Which clones and imports ended how, by method "
              "(reflink is instant, copy is not), since the agent started?",
              [(since_start("phyllome_storage_clones_total", "host, method, outcome"),
                "{{host}} {{method}} {{outcome}}")], kind="bargauge", instant=True),
        Panel("Transfers", "Which volume transfers between hosts completed or failed, "
              "since the agent started?",
              [(since_start("phyllome_storage_transfers_total", "host, direction, outcome"),
                "{{host}} {{direction}} {{outcome}}")], kind="bargauge", instant=True),
        Panel("Bytes copied", "How fast do clones and transfers move data?",
              [(f"sum by (host, op) (rate(phyllome_storage_copied_bytes_total{{{H}}}[{RATE}]))",
                "{{host}} {{op}}"),
               (f"sum by (host) (rate(phyllome_storage_wire_bytes_total{{{H}}}[{RATE}]))",
                "{{host}} on the wire")], unit="Bps"),
        Panel("Bytes skipped as holes", "How much did sparse copies NOT have to read or send, "
              "since the agent started?",
              [(since_start("phyllome_storage_hole_bytes_total", "host, op"), "{{host}} {{op}}")],
              kind="bargauge", instant=True, unit="bytes"),
        Panel("Checksum failures", "Was data damaged on the wire or on disk, since the agent "
              "started? (0 is good)",
              [(since_start("phyllome_storage_checksum_failures_total", "host, side"),
                "{{host}} {{side}}")], kind="stat", instant=True, thresholds=[(1, "red")]),
        Panel("Operation time (p95)", "How long do clones, imports and transfers take "
              "(since the agent started)?",
              [("histogram_quantile(0.95, sum by (op, le) ("
                f"phyllome_storage_operation_duration_seconds_bucket{{{H}}}))",
                "{{op}}")], kind="bargauge", instant=True, unit="s"),
        Panel("Throughput (median)", "What rate do copies and transfers reach (since the "
              "agent started)?",
              [("histogram_quantile(0.5, sum by (op, le) ("
                f"phyllome_storage_throughput_bytes_per_second_bucket{{{H}}}))",
                "{{op}}")], kind="bargauge", instant=True, unit="Bps"),
        Panel("Jobs running", "How many long operations (clone, import, send, pull, bind) "
              "run now, per agent?",
              [(f'{{__name__=~"phyllome_.+_jobs_running", {H}}}', "{{host}} {{agent}}")]),
        Panel("Jobs finished", "How did jobs end, by agent and kind, since the agents "
              "started?",
              [(f'sum by (agent, kind, state) ({{__name__=~"phyllome_.+_jobs_total", {H}}})',
                "{{agent}} {{kind}} {{state}}")],
              kind="bargauge", instant=True),
    ])


def catalogue() -> dict[str, Any]:
    m = "phyllome_catalogue"
    return dashboard("phyllome-catalogue", "Phyllome image catalogue",
                     "Which images are known and pulled, and are their sources healthy?", [
        Panel("Images by source and state", "How many images does each source list, how "
              "many can be downloaded, how many are pulled here?",
              [(f"sum by (source, state) ({m}_images{{{H}}})", "{{source}} {{state}}")],
              kind="bargauge", instant=True),
        Panel("Sources up", "Could each source's index be read at the last refresh?",
              [(f"{m}_source_up{{{H}}}", "{{host}} {{source}}")], kind="stat", instant=True,
              mappings={"0": "down", "1": "up"}, thresholds=[(1, "green")]),
        Panel("Broken image links", "How many image URLs failed their last probe (link "
              "rot)?", [(f"sum by (source) ({m}_links_broken{{{H}}})", "{{source}}")],
              kind="stat", instant=True, thresholds=[(1, "orange")]),
        Panel("Pulls", "How did image pulls end in the time range?",
              [(f"sum by (outcome) (increase({m}_pulls_total{{{H}}}[{RANGE}]))", "{{outcome}}")],
              kind="bargauge", instant=True),
        Panel("Download rate", "How fast are images downloaded?",
              [(f"sum by (host) (rate({m}_downloaded_bytes_total{{{H}}}[{RATE}]))", "{{host}}")],
              unit="Bps"),
        Panel("Link probes", "How many image URL probes found a link ok or broken?",
              [(f"sum by (outcome) (increase({m}_link_probes_total{{{H}}}[{RANGE}]))",
                "{{outcome}}")], kind="bargauge", instant=True),
        Panel("Pulls running", "How many pulls run now?",
              [(f"{m}_jobs_running{{{H}}}", "{{host}}")]),
    ])


def bus() -> dict[str, Any]:
    name = "phyllome_.+"
    return dashboard("phyllome-bus", "Phyllome bus health",
                     "Are the agents connected to NATS, and do requests and events flow?", [
        Panel("Connected to NATS", "Is each agent connected to NATS now?",
              [(f'{{__name__=~"{name}_bus_connected", {H}}}', "{{host}} {{agent}}")],
              kind="state-timeline", mappings={"0": "disconnected", "1": "connected"},
              thresholds=[(1, "green")]),
        Panel("Reconnections", "How often did agents lose and regain NATS in the range?",
              [(f'sum by (host, agent) (increase({{__name__=~"{name}_bus_reconnects_total", '
                f"{H}}}[{RANGE}]))", "{{host}} {{agent}}")], kind="bargauge", instant=True),
        Panel("Requests by endpoint", "Which endpoints are called, and how do they answer?",
              [(f"sum by (agent, endpoint, outcome) (phyllome:requests:rate5m{{{H}}})",
                "{{agent}} {{endpoint}} {{outcome}}")], unit="reqps"),
        Panel("Request time (p95)", "How long do agents take to answer?",
              [(f"phyllome:request_duration_seconds:p95_rate5m{{{H}}}", "{{host}} {{agent}}")],
              unit="s"),
        Panel("Request error ratio", "Which share of requests fails, per agent?",
              [(f"phyllome:request_errors:ratio_rate5m{{{H}}}", "{{host}} {{agent}}")],
              unit="percentunit"),
        Panel("Events published", "Which events do agents publish to JetStream?",
              [(f'sum by (agent, kind) (rate({{__name__=~"{name}_events_published_total", '
                f"{H}}}[{RATE}]))", "{{agent}} {{kind}}")], unit="ops"),
        Panel("Events not acknowledged", "Did JetStream refuse or lose events? (0 is good)",
              [(f'sum by (host, agent) (increase({{__name__=~"{name}_events_failed_total", '
                f"{H}}}[{RANGE}]))", "{{host}} {{agent}}")], kind="stat", instant=True,
              thresholds=[(1, "red")], width=24),
    ])


DASHBOARDS = {"overview": overview, "host": host, "vms": vms, "storage": storage,
              "catalogue": catalogue, "bus": bus}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"phyllome-{name}.json": json.dumps(build(), indent=2) + "\n"
            for name, build in DASHBOARDS.items()}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
