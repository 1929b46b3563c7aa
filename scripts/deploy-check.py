"""The checks of scripts/deploy-check.sh that need Python: run by it, in its virtualenv (PyYAML,
jsonschema and kubernetes-validate), one subcommand per check. Each prints what it checked and
exits non-zero naming every problem it found; each also runs itself once on a copy of its input
with a mistake put in, and fails if that mistake goes unnoticed, so a check that can no longer
fail does not pass quietly.

  render DIR                   renders a kustomization without kubectl (see render_kustomization)
  same-objects A.yaml B.yaml   the two renderings hold the same objects
  kubernetes FILE...           validates every manifest: core kinds with kubernetes-validate,
                               the KEDA ScaledObject with deploy/kubernetes/schemas/
  compose FILE                 validates a compose file against deploy/schemas/compose-spec.json
  alert-tests RULES TESTS DOC  every alert has a firing and a quiet test case, and a runbook
                               section in DOC
  dashboard-rules JSON OUT     writes the dashboard's queries as recording rules, for promtool
  traffic API_URL              submits a job through the API and waits for it to finish
  metric-names SCRAPE... --queries FILE...
                               every metric the queries of FILE (rules or dashboard) name is
                               one a scrape of SCRAPE (exposition files) has, with its labels
"""

import argparse
import base64
import copy
import json
import os
import pathlib
import re
import sys
import time
import urllib.request

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEDA_SCHEMA = ROOT / "deploy/kubernetes/schemas/keda.sh-v1alpha1-scaledobject.json"
COMPOSE_SCHEMA = ROOT / "deploy/schemas/compose-spec.json"
# The oldest Kubernetes release the manifests are meant for, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Kinds that belong to no namespace (kustomize leaves their namespace unset).
CLUSTER_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                 "PriorityClass", "StorageClass", "PersistentVolume"}
# Labels that Prometheus gives every series of a target.
TARGET_LABELS = {"job", "instance"}


def fail(problems, what):
    """Exits naming every problem, or says what passed."""
    if problems:
        for problem in problems:
            print(f"  FAILED: {problem}", file=sys.stderr)
        sys.exit(f"FAILED, {len(problems)} problem(s) above; the check was: {what}")
    print(f"  ok: {what}")


def must_catch(problems, mistake):
    """Stops if the check found nothing in an input with `mistake` put in."""
    if not problems:
        sys.exit(f"the check no longer notices {mistake}: it cannot fail as it is")


def load_all(path):
    with open(path) as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


# ---- render ----------------------------------------------------------------------------------

def render_kustomization(directory):
    """Renders the kustomization in `directory` as kubectl kustomize would, for the few fields
    deploy/kubernetes uses, and stops on any other: `resources` (files, concatenated in their
    order), `namespace` (set on every namespaced object), `labels` (`pairs` added to each
    object's own labels), `secretGenerator` from `envs` files (a Secret without kustomize's
    name hash, so references to it are left as they are) and `images` (`newName`/`newTag`)."""
    directory = pathlib.Path(directory)
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "namespace", "labels", "secretGenerator", "images"}
    unknown = set(spec) - known
    if unknown:
        sys.exit(f"the renderer does not handle {sorted(unknown)}: install kubectl")
    objects = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if not path.is_file():
            sys.exit(f"the renderer handles resource files only, not {resource}")
        objects.extend(load_all(path))
    for generator in spec.get("secretGenerator", []):
        if set(generator) - {"name", "envs"}:
            sys.exit(f"the renderer handles a secretGenerator's name and envs only: {generator}")
        data = {}
        for env_file in generator.get("envs", []):
            for line in (directory / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, _, value = line.partition("=")
                    data[key.strip()] = base64.b64encode(value.encode()).decode()
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": generator["name"]}, "data": data})
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if "namespace" in spec and obj["kind"] not in CLUSTER_KINDS:
            metadata["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            if set(label) - {"pairs"}:
                sys.exit(f"the renderer handles labels' pairs only: {label}")
            metadata.setdefault("labels", {}).update(label["pairs"])
        for container in containers_of(obj):
            for image in spec.get("images", []):
                if container.get("image") == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def containers_of(obj):
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def identities(objects):
    """(kind, namespace, name) of each object; a generated Secret's name without its hash."""
    found = set()
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "Secret":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)
        found.add((obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), name))
    return found


def command_render(args):
    yaml.safe_dump_all(render_kustomization(args.directory), sys.stdout, sort_keys=False)


def command_same_objects(args):
    first, second = identities(load_all(args.first)), identities(load_all(args.second))
    problems = [f"only in {args.first}: {item}" for item in sorted(first - second, key=str)]
    problems += [f"only in {args.second}: {item}" for item in sorted(second - first, key=str)]
    fail(problems, f"{args.first} and {args.second} hold the same {len(first)} objects")


# ---- kubernetes ------------------------------------------------------------------------------

def kubernetes_problems(objects, where):
    with open(KEDA_SCHEMA) as file:
        keda = jsonschema.Draft202012Validator(json.load(file))
    problems = []
    for obj in objects:
        name = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion") == "keda.sh/v1alpha1" and obj.get("kind") == "ScaledObject":
            for error in keda.iter_errors(obj):
                path = ".".join(str(part) for part in error.absolute_path)
                problems.append(f"{name}: {path}: {error.message}")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                problems.append(f"{name} (Kubernetes {version}): {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{name}: no schema: {error.message}")
    return problems


def command_kubernetes(args):
    objects = {path: load_all(path) for path in args.files}
    problems = [p for path, docs in objects.items() for p in kubernetes_problems(docs, path)]
    count = sum(len(docs) for docs in objects.values())
    kinds = sorted({obj["kind"] for docs in objects.values() for obj in docs})
    # A misspelt field, in a Deployment and in the ScaledObject, must be refused.
    for kind in ("Deployment", "ScaledObject"):
        for path, docs in objects.items():
            mutated = copy.deepcopy([obj for obj in docs if obj["kind"] == kind][:1])
            if mutated:
                mutated[0]["spec"]["replicaCountt"] = 2
                must_catch(kubernetes_problems(mutated, path), f"a misspelt field in a {kind}")
                break
    versions = " and ".join(KUBERNETES_VERSIONS)
    fail(problems, f"{count} manifests ({', '.join(kinds)}) valid for Kubernetes {versions}")


# ---- compose ---------------------------------------------------------------------------------

def compose_problems(doc, base):
    with open(COMPOSE_SCHEMA) as file:
        schema = json.load(file)
    # The file declares draft 2019-09 (with a "$schema" URI the library does not recognise).
    validator = jsonschema.Draft201909Validator(schema)
    problems = []
    for error in validator.iter_errors(doc):
        path = ".".join(str(part) for part in error.absolute_path)
        problems.append(f"{path}: {error.message}")
    # What the schema cannot know: the files it names exist, relative to the compose file.
    for name, service in (doc.get("services") or {}).items():
        build = service.get("build")
        if isinstance(build, dict):
            context = base / build.get("context", ".")
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"services.{name}.build: no Dockerfile in {context}")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")) and not (base / source).exists():
                problems.append(f"services.{name}.volumes: {source} does not exist")
    return problems


def command_compose(args):
    path = pathlib.Path(args.file)
    doc = yaml.safe_load(path.read_text())
    mutated = copy.deepcopy(doc)
    next(iter(mutated["services"].values()))["stop_grace_periodd"] = "1s"
    must_catch(compose_problems(mutated, path.parent), "an unknown field in a service")
    services = ", ".join(doc["services"])
    fail(compose_problems(doc, path.parent),
         f"{path} follows the Compose specification ({services})")


# ---- alert rules -----------------------------------------------------------------------------

def anchor(heading):
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def command_alert_tests(args):
    rules = [rule for group in yaml.safe_load(open(args.rules))["groups"]
             for rule in group["rules"] if "alert" in rule]
    tests = yaml.safe_load(open(args.tests))["tests"]
    doc = pathlib.Path(args.doc)
    anchors = {anchor(line.lstrip("#")) for line in doc.read_text().splitlines()
               if line.startswith("#")}
    names = {rule["alert"] for rule in rules}
    fires, quiet = set(), set()
    problems = []
    for test in tests:
        for case in test.get("alert_rule_test", []):
            if case["alertname"] not in names:
                problems.append(f"{test['name']}: no alert {case['alertname']} in {args.rules}")
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    for rule in rules:
        name = rule["alert"]
        if name not in fires:
            problems.append(f"{name}: no test case where it fires")
        if name not in quiet:
            problems.append(f"{name}: no test case where it stays quiet")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            if not annotations.get(key):
                problems.append(f"{name}: no {key} annotation")
        runbook = annotations.get("runbook", "")
        target, _, section = runbook.partition("#")
        if (ROOT / target).resolve() != doc.resolve() or section not in anchors:
            problems.append(f"{name}: runbook {runbook!r} is no section of {args.doc}")
    fail(problems, f"{len(rules)} alerts, each tested firing and quiet, each with its runbook")


# ---- dashboard -------------------------------------------------------------------------------

# Values for the dashboard's variables, so that its queries parse as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$queue": ".*", "$jobs": "taskfleet-scheduler|taskfleet-worker"}


def dashboard_queries(dashboard):
    """Every PromQL query of a dashboard: its panels' targets and its query variables."""
    queries = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                queries.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def command_dashboard_rules(args):
    dashboard = json.loads(pathlib.Path(args.dashboard).read_text())
    variables = dashboard.get("templating", {}).get("list", [])
    if not any(variable.get("name") == "datasource" and variable.get("type") == "datasource"
               and variable.get("query") == "prometheus" for variable in variables):
        sys.exit(f"{args.dashboard}: no variable `datasource` of type prometheus")
    for panel in dashboard.get("panels", []):
        if panel.get("type") != "row" and panel.get("datasource", {}).get("uid") != "${datasource}":
            sys.exit(f"{args.dashboard}: panel {panel.get('title')!r} does not use ${{datasource}}")
    rules = []
    for number, query in enumerate(dashboard_queries(dashboard)):
        if query.startswith("label_values("):
            continue
        for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
            query = query.replace(variable, GRAFANA_VARIABLES[variable])
        if "$" in query:
            sys.exit(f"{args.dashboard}: a query uses a variable the check does not know: {query}")
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    with open(args.out, "w") as file:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, file)
    print(f"  ok: {len(rules)} dashboard queries written to {args.out} for promtool")


# ---- metric names ----------------------------------------------------------------------------

def command_traffic(args):
    """Submits one dataflow job and waits for it: after that a scrape lists the histograms,
    which appear with their first observations."""
    headers = {"Authorization": f"Bearer {os.environ['TASKFLEET_API_KEY']}",
               "Content-Type": "application/json"}
    body = json.dumps({"dataflow": ".n + 1", "input": {"n": 41}}).encode()
    request = urllib.request.Request(f"{args.api}/v1/tasks", body, headers, method="POST")
    job = json.load(urllib.request.urlopen(request, timeout=30))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{args.api}/v1/tasks/{job['id']}?wait=10",
                                         headers=headers)
        shown = json.load(urllib.request.urlopen(request, timeout=30))
        if shown["status"] == "succeeded" and shown["output"] == 42:
            print(f"  ok: job {job['id']} succeeded")
            return
        if shown["status"] not in ("queued", "running"):
            sys.exit(f"the job did not succeed: {shown}")
    sys.exit("the job did not finish within 60 s")


def scraped_families(paths):
    """{series name: label names} from exposition files; a histogram family is listed by its
    _bucket, _sum and _count series only, since no series has the family's bare name."""
    types, labels = {}, {}
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                types[name] = kind
            elif line and not line.startswith("#"):
                match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", line)
                names = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"", match.group(2) or ""))
                labels.setdefault(match.group(1), set()).update(names)
    series = {}
    for name, kind in types.items():
        if kind in ("histogram", "summary"):
            for suffix in ("_bucket", "_sum", "_count"):
                series[name + suffix] = labels.get(name + suffix, set()) | TARGET_LABELS
        else:
            series[name] = labels.get(name, set()) | TARGET_LABELS
    return series


def query_strings(path):
    """The PromQL of a rules file (expressions and annotation templates) or of a dashboard."""
    if path.endswith(".json"):
        return dashboard_queries(json.loads(pathlib.Path(path).read_text()))
    strings = []
    for group in yaml.safe_load(pathlib.Path(path).read_text())["groups"]:
        for rule in group["rules"]:
            strings.append(rule["expr"])
            strings.extend(rule.get("annotations", {}).values())
    return strings


SELECTOR = re.compile(r'\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}')
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def name_problems(query, series, where):
    problems = []
    used = set(re.findall(r"\btaskfleet_[a-z0-9_]+", query))
    for name in sorted(used - set(series)):
        problems.append(f"{where}: {name} is in no scrape of a scheduler or a worker: {query}")
    known = set(TARGET_LABELS)
    for name in used & set(series):
        known |= series[name] | ({"le"} if name.endswith("_bucket") else set())
    for name, matchers in SELECTOR.findall(query):
        if name.startswith("taskfleet_") and name in series:
            bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', matchers)
            allowed = series[name] | ({"le"} if name.endswith("_bucket") else set())
            for label in sorted(set(MATCHER_LABEL.findall(bare)) - allowed):
                problems.append(f"{where}: {name} has no label {label}: {query}")
    if used:
        for grouping in GROUPING.findall(query):
            for label in sorted({l.strip() for l in grouping.split(",") if l.strip()} - known):
                problems.append(f"{where}: no metric of the query has the label {label}: {query}")
    return problems


def command_metric_names(args):
    series = scraped_families(args.scrapes)
    problems, checked = [], 0
    for path in args.queries:
        for query in query_strings(path):
            checked += 1
            problems += name_problems(query, series, path)
    must_catch(name_problems("rate(taskfleet_runs_finishd_total[5m])", series, "self-test"),
               "a misspelt metric name")
    must_catch(name_problems('sum by (queue) (taskfleet_runs_finished_total{state="x"})',
                             series, "self-test"), "a label the metric does not have")
    fail(problems, f"{checked} queries and annotations name only metrics and labels of a real scrape "
                   f"({len(series)} series names)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True)
    render = commands.add_parser("render")
    render.add_argument("directory")
    render.set_defaults(run=command_render)
    same = commands.add_parser("same-objects")
    same.add_argument("first")
    same.add_argument("second")
    same.set_defaults(run=command_same_objects)
    kubernetes = commands.add_parser("kubernetes")
    kubernetes.add_argument("files", nargs="+")
    kubernetes.set_defaults(run=command_kubernetes)
    compose = commands.add_parser("compose")
    compose.add_argument("file")
    compose.set_defaults(run=command_compose)
    alert_tests = commands.add_parser("alert-tests")
    alert_tests.add_argument("rules")
    alert_tests.add_argument("tests")
    alert_tests.add_argument("doc")
    alert_tests.set_defaults(run=command_alert_tests)
    dashboard_rules = commands.add_parser("dashboard-rules")
    dashboard_rules.add_argument("dashboard")
    dashboard_rules.add_argument("out")
    dashboard_rules.set_defaults(run=command_dashboard_rules)
    traffic = commands.add_parser("traffic")
    traffic.add_argument("api")
    traffic.set_defaults(run=command_traffic)
    names = commands.add_parser("metric-names")
    names.add_argument("scrapes", nargs="+")
    names.add_argument("--queries", nargs="+", required=True)
    names.set_defaults(run=command_metric_names)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
