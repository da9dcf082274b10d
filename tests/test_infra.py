"""The CDK app in infra/: configuration, every resource and its key properties, least-privilege IAM,
the cdk-nag AwsSolutions pack, and the contract with the guard Lambda's code.

Each app is synthesized once per module (starting jsii costs seconds). The default app is built from
the real ``cdk.json`` context (feature flags included), so it is the template ``make synth`` writes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _cdk_support import CDK_JSON, CONTEXT, ROOT, team_stack
from aws_cdk import App, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_lambda as lambda_
from aws_cdk.assertions import Annotations, Match, Template

from busy_guard import schema
from busy_guard_infra.application import build_app
from busy_guard_infra.config import (
    DEFAULTS,
    BusyGuardConfig,
    ConfigError,
    GuardSettings,
    max_wait_limit_seconds,
)
from busy_guard_infra.constants import ASSET_EXCLUDES
from busy_guard_infra.constructs.guard import PARTITION_NAME_MAX_LENGTH, BusyGuard, size_problems
from busy_guard_infra.constructs.table import BusyTable
from busy_guard_infra.constructs.writer_policy import WriterPolicy

STREAM_ARN = (
    "arn:aws:dynamodb:eu-west-1:123456789012:table/busy_guard.instance_busy/stream/2024-01-01T00:00:00.000"
)
TOPIC_ARN = "arn:aws:sns:eu-west-1:123456789012:ops-alarms"
CUSTOM = {
    **CONTEXT,
    # the forms `cdk deploy -c key=value` produces: strings throughout
    "asgNames": "graph-a, graph-b",
    "hookName": "graph-guard",
    "heartbeatTimeoutSeconds": "600",
    "defaultResult": "abandon",
    "maxWaitSeconds": "59000",
    "maxWaitResult": "ABANDON",
    "importTable": "true",
    "tableStreamArn": STREAM_ARN,
    "removalPolicy": "DESTROY",
    "alarmTopicArn": TOPIC_ARN,
}
NAG_ERRORS = Match.string_like_regexp("(AwsSolutions|Serverless)-.*")
GROUP_ARN_PREFIX = [
    "arn:",
    {"Ref": "AWS::Partition"},
    ":autoscaling:",
    {"Ref": "AWS::Region"},
    ":",
    {"Ref": "AWS::AccountId"},
]


# --- fixtures: each app once per module ------------------------------------------------------------
@pytest.fixture(scope="module")
def default_stack() -> Stack:
    _, stack = build_app(CONTEXT)
    return stack


@pytest.fixture(scope="module")
def template(default_stack: Stack) -> Template:
    return Template.from_stack(default_stack)


@pytest.fixture(scope="module")
def custom_stack() -> Stack:
    _, stack = build_app(CUSTOM)
    return stack


@pytest.fixture(scope="module")
def custom(custom_stack: Stack) -> Template:
    return Template.from_stack(custom_stack)


@pytest.fixture(scope="module")
def team() -> Template:
    """A team's own stack: its AutoScalingGroup object, guarded with the constructs directly."""
    stack, group = team_stack()
    table = BusyTable(stack, "BusyTable", table_name="team.instance_busy").table
    BusyGuard(
        stack,
        "BusyGuard",
        table=table,
        groups=[group],
        settings=GuardSettings(heartbeat_timeout_seconds=300, max_wait_seconds=6 * 3600),
    )
    group.role.add_managed_policy(WriterPolicy(stack, "Writers", table=table).policy)
    return Template.from_stack(stack)


def only(template: Template, resource_type: str) -> tuple[str, dict[str, Any]]:
    resources = template.find_resources(resource_type)
    assert len(resources) == 1, f"expected one {resource_type}, found {sorted(resources)}"
    return next(iter(resources.items()))


def logical_id(template: Template, resource_type: str) -> str:
    return only(template, resource_type)[0]


def statements(template: Template, resource_type: str = "AWS::IAM::Policy") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for resource in template.find_resources(resource_type).values():
        found += resource["Properties"]["PolicyDocument"]["Statement"]
    return found


def actions_of(statement: dict[str, Any]) -> set[str]:
    action = statement["Action"]
    return {action} if isinstance(action, str) else set(action)


def guard_statement(template: Template, action: str) -> dict[str, Any]:
    matching = [s for s in statements(template) if action in actions_of(s)]
    assert len(matching) == 1, matching
    return matching[0]


def environment(template: Template) -> dict[str, Any]:
    return only(template, "AWS::Lambda::Function")[1]["Properties"]["Environment"]["Variables"]


def load_app_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("busy_guard_cdk_app", ROOT / "infra" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- configuration: cdk.json, defaults, and every invalid value ------------------------------------
def test_cdk_json_runs_the_app_in_infra_with_the_documented_defaults() -> None:
    assert CDK_JSON["app"] == "python3 infra/app.py"
    for key, default in DEFAULTS.items():
        assert CONTEXT[key] == default, key
    assert CONTEXT["asgNames"] == ["my-graph-db-asg"]
    assert CONTEXT["@aws-cdk/aws-iam:minimizePolicies"] is True


def config_from(**overrides: Any) -> BusyGuardConfig:
    values = {**CONTEXT, **overrides}
    return BusyGuardConfig.from_context(values.get)


def test_context_strings_as_given_by_dash_c_are_parsed() -> None:
    config = BusyGuardConfig.from_context(CUSTOM.get)
    assert config.asg_names == ("graph-a", "graph-b")
    assert config.settings.heartbeat_timeout_seconds == 600
    assert config.settings.default_result == "ABANDON"
    assert config.settings.max_wait_result == "ABANDON"
    assert config.import_table is True
    assert config.removal_policy == "DESTROY"
    assert config_from(asgNames='["a", "b"]').asg_names == ("a", "b")


def test_defaults_apply_to_missing_keys() -> None:
    config = BusyGuardConfig.from_context({"asgNames": ["g"]}.get)
    # The construct's own default reads bare-id items (a team's table may hold them); the app's
    # created table can't, so it doesn't.
    assert config.settings == GuardSettings(read_legacy_keys=False)
    assert config.settings.heartbeat_timeout_seconds == 900
    assert config.settings.max_wait_seconds == 12 * 3600
    assert config.table_name == "busy_guard.instance_busy"
    assert config.removal_policy == "RETAIN"
    assert config.alarm_topic_arn is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"heartbeatTimeoutSeconds": 29}, r"heartbeatTimeoutSeconds must be between 30 and 7200 s"),
        ({"heartbeatTimeoutSeconds": 7201}, r"heartbeatTimeoutSeconds must be between 30 and 7200 s"),
        (
            {"heartbeatTimeoutSeconds": 179},
            r"heartbeatTimeoutSeconds must be between 180 and 7200 s: the 60 s reconcile .* two missed ticks",
        ),
        (
            {"heartbeatTimeoutSeconds": 300, "maxWaitSeconds": 29701},
            r"maxWaitSeconds must be between 60 and 29700 s \(no longer than "
            r"min\(100 x heartbeatTimeoutSeconds, 48 h\) - heartbeatTimeoutSeconds = 29700 s",
        ),
        (
            {"heartbeatTimeoutSeconds": 7200, "maxWaitSeconds": 46 * 3600 + 1},
            r"maxWaitSeconds must be between 60 and 165600 s",
        ),
        ({"maxWaitSeconds": 59}, r"maxWaitSeconds must be between 60 and 89100 s"),
        ({"reservedConcurrency": 1}, r"reservedConcurrency must be between 2 and 100"),
        ({"reservedConcurrency": "many"}, r"reservedConcurrency must be a whole number; got 'many'"),
        ({"asgNames": []}, r"asgNames must name at least one Auto Scaling group"),
        ({"asgNames": ""}, r"asgNames must name at least one Auto Scaling group"),
        ({"asgNames": None}, r"asgNames must name at least one Auto Scaling group"),
        ({"asgNames": ["a,b"]}, r"asgNames: a name must not contain a comma"),
        ({"asgNames": ["a", "a"]}, r"asgNames: each group must be named once; repeated: a"),
        ({"asgNames": [" a"]}, r"asgNames: each name must be 1 to 255 characters"),
        ({"asgNames": 7}, r"asgNames must be a list of Auto Scaling group names"),
        ({"asgNames": "[not json"}, r"asgNames is not a valid JSON list"),
        ({"hookName": "no spaces"}, r"hookName must be 1 to 255 characters of A-Z a-z 0-9 - _ /"),
        ({"defaultResult": "RETRY"}, r"defaultResult must be one of CONTINUE, ABANDON; got 'RETRY'"),
        ({"maxWaitResult": "WAIT"}, r"maxWaitResult must be one of CONTINUE, ABANDON"),
        ({"heartbeatTimeoutSeconds": "15m"}, r"heartbeatTimeoutSeconds must be a whole number of seconds"),
        ({"heartbeatTimeoutSeconds": True}, r"heartbeatTimeoutSeconds must be a whole number of seconds"),
        ({"clockSkewSeconds": 301}, r"clockSkewSeconds must be between 0 and 300 s"),
        ({"legacyStaleSeconds": 10}, r"legacyStaleSeconds must be between 60 and 604800 s"),
        ({"releasedTtlSeconds": 60}, r"releasedTtlSeconds must be between 3600 and 31536000 s"),
        ({"tableName": "x"}, r"tableName must be 3 to 255 characters"),
        ({"importTable": "yes"}, r"importTable must be true or false"),
        ({"importTable": True}, r"tableStreamArn is required when importTable is true"),
        (
            {"importTable": True, "tableStreamArn": STREAM_ARN.replace("busy_guard.instance_busy", "other")},
            r"tableStreamArn must be the stream of tableName 'busy_guard.instance_busy'",
        ),
        ({"tableStreamArn": STREAM_ARN}, r"tableStreamArn is only used with importTable=true"),
        ({"removalPolicy": "SNAPSHOT"}, r"removalPolicy must be one of RETAIN, DESTROY"),
        ({"alarmTopicArn": "ops-alarms"}, r"alarmTopicArn must be an SNS topic ARN"),
        ({"stackName": "1-bad"}, r"stackName must start with a letter"),
        ({"keyScheme": "arn"}, r"keyScheme must be one of isolated, legacy; got 'arn'"),
        ({"keyScheme": 7}, r"keyScheme must be one of isolated, legacy; got 7"),
        ({"readLegacyKeys": "sometimes"}, r"readLegacyKeys must be true or false; got 'sometimes'"),
        (
            {"keyScheme": "legacy", "readLegacyKeys": "true"},
            r"readLegacyKeys can't be true with keyScheme=legacy: legacy items are keyed by the bare "
            r"instance id already",
        ),
        (
            # an imported table defaults to legacy, so readLegacyKeys=true needs keyScheme=isolated
            {"importTable": True, "tableStreamArn": STREAM_ARN, "readLegacyKeys": True},
            r"readLegacyKeys can't be true with keyScheme=legacy",
        ),
    ],
)
def test_each_invalid_value_is_refused_naming_its_key_and_range(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from(**overrides)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        config_from(asgNames=[], heartbeatTimeoutSeconds=100, removalPolicy="KEEP")
    assert len(raised.value.problems) == 3
    assert str(raised.value).startswith("invalid busy-guard configuration:\n  - ")


def test_max_wait_limit_is_one_heartbeat_under_min_of_100_heartbeats_and_48_hours() -> None:
    assert max_wait_limit_seconds(900) == 90_000 - 900
    assert max_wait_limit_seconds(7200) == 48 * 3600 - 7200
    config_from(heartbeatTimeoutSeconds=900, maxWaitSeconds=89_100)  # the limit itself is allowed


def test_the_construct_validates_its_settings_too() -> None:
    with pytest.raises(ConfigError, match="heartbeatTimeoutSeconds must be between 180 and 7200 s"):
        GuardSettings(heartbeat_timeout_seconds=60)


def test_the_key_scheme_defaults_by_table_and_an_explicit_value_wins() -> None:
    imported = {"importTable": True, "tableStreamArn": STREAM_ARN}
    created = config_from().settings
    assert (created.key_scheme, created.reads_legacy_keys) == ("isolated", False)  # no bare id can be there
    legacy = config_from(**imported).settings  # the replaced system's bare-id items until migrated
    assert (legacy.key_scheme, legacy.reads_legacy_keys) == ("legacy", False)
    # the migration's steps on the imported table, in the string forms -c gives
    step_2 = config_from(**imported, keyScheme="isolated").settings
    assert (step_2.key_scheme, step_2.reads_legacy_keys) == ("isolated", True)
    step_3 = config_from(**imported, keyScheme=" Isolated ", readLegacyKeys="false").settings
    assert (step_3.key_scheme, step_3.reads_legacy_keys) == ("isolated", False)
    explicit_legacy = config_from(keyScheme="legacy", readLegacyKeys=False).settings
    assert (explicit_legacy.key_scheme, explicit_legacy.reads_legacy_keys) == ("legacy", False)
    # a context without the keys at all (not even cdk.json's empty values) defaults the same way
    assert BusyGuardConfig.from_context({"asgNames": ["g"]}.get).settings.key_scheme == "isolated"
    assert BusyGuardConfig.from_context({"asgNames": ["g"], **imported}.get).settings.key_scheme == "legacy"


def test_the_construct_takes_the_key_scheme_keyword_only_with_the_same_checks() -> None:
    assert GuardSettings().key_scheme == "isolated"
    assert GuardSettings(key_scheme="legacy").reads_legacy_keys is False
    assert GuardSettings(read_legacy_keys=False).reads_legacy_keys is False
    with pytest.raises(ConfigError, match="readLegacyKeys can't be true with keyScheme=legacy"):
        GuardSettings(key_scheme="legacy", read_legacy_keys=True)
    with pytest.raises(ConfigError, match="keyScheme must be one of isolated, legacy; got 'ISOLATED'"):
        GuardSettings(key_scheme="ISOLATED")  # type: ignore[arg-type]


def test_a_bad_key_scheme_fails_synth_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    app_module = load_app_module()
    assert app_module.main({**CONTEXT, "keyScheme": "arn", "readLegacyKeys": "true"}) == 1
    error = capsys.readouterr().err
    assert "keyScheme must be one of isolated, legacy; got 'arn'" in error
    assert app_module.main({**CONTEXT, "keyScheme": "legacy", "readLegacyKeys": "true"}) == 1
    assert "readLegacyKeys can't be true with keyScheme=legacy" in capsys.readouterr().err


def test_invalid_context_fails_synth_with_its_message(capsys: pytest.CaptureFixture[str]) -> None:
    """What `cdk synth -c heartbeatTimeoutSeconds=120` does: the app exits 1 and says why."""
    with pytest.raises(ConfigError, match="heartbeatTimeoutSeconds must be between 180 and 7200 s"):
        build_app({**CONTEXT, "heartbeatTimeoutSeconds": "120"})
    app_module = load_app_module()
    assert app_module.main({**CONTEXT, "heartbeatTimeoutSeconds": "120", "maxWaitResult": "NEVER"}) == 1
    error = capsys.readouterr().err
    assert "busy-guard: invalid busy-guard configuration:" in error
    assert "heartbeatTimeoutSeconds must be between 180 and 7200 s" in error
    assert "maxWaitResult must be one of CONTINUE, ABANDON" in error


# --- the busy table --------------------------------------------------------------------------------
def test_table_key_billing_recovery_ttl_stream_encryption_and_retention(template: Template) -> None:
    template.has_resource(
        "AWS::DynamoDB::Table",
        {
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
            "Properties": {
                "TableName": "busy_guard.instance_busy",
                "KeySchema": [{"AttributeName": schema.INSTANCE_ID, "KeyType": "HASH"}],
                "AttributeDefinitions": [{"AttributeName": schema.INSTANCE_ID, "AttributeType": "S"}],
                "BillingMode": "PAY_PER_REQUEST",
                "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
                "TimeToLiveSpecification": {"AttributeName": schema.TTL, "Enabled": True},
                "StreamSpecification": {"StreamViewType": "NEW_AND_OLD_IMAGES"},
                "SSESpecification": {"SSEEnabled": True},
                "DeletionProtectionEnabled": True,
            },
        },
    )


def test_an_existing_table_is_imported_by_name_and_stream(custom: Template) -> None:
    custom.resource_count_is("AWS::DynamoDB::Table", 0)
    custom.has_resource_properties("AWS::Lambda::EventSourceMapping", {"EventSourceArn": STREAM_ARN})
    table_arn = guard_statement(custom, "dynamodb:Scan")["Resource"]
    assert json.dumps(table_arn).endswith(':table/busy_guard.instance_busy"]]}')


# --- the guard Lambda ------------------------------------------------------------------------------
def test_function_runtime_code_layer_tracing_timeout_and_memory(template: Template) -> None:
    _, function = only(template, "AWS::Lambda::Function")
    props = function["Properties"]
    assert props["Runtime"] == "python3.13"
    assert props["Architectures"] == ["arm64"]
    assert props["Handler"] == "busy_guard.guard.handler.handler"
    assert props["TracingConfig"] == {"Mode": "Active"}
    assert props["Timeout"] == 50
    assert props["MemorySize"] == 1024
    assert props["LoggingConfig"] == {"LogGroup": {"Ref": logical_id(template, "AWS::Logs::LogGroup")}}
    assert props["ReservedConcurrentExecutions"] == 10
    layer_id, layer = only(template, "AWS::Lambda::LayerVersion")
    assert props["Layers"] == [{"Ref": layer_id}]  # the stack's own layer: no account, region or partition
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.13"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    template.has_resource(
        "AWS::Logs::LogGroup", {"Properties": {"RetentionInDays": 30}, "DeletionPolicy": "Retain"}
    )


def test_function_environment_is_the_handlers_contract(template: Template) -> None:
    env = environment(template)
    assert env == {
        "BUSY_GUARD_TABLE": {"Ref": logical_id(template, "AWS::DynamoDB::Table")},
        "BUSY_GUARD_ASG_NAMES": "my-graph-db-asg",
        "BUSY_GUARD_HOOK_NAME": "busy-guard",
        "BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS": "900",
        "BUSY_GUARD_MAX_WAIT_SECONDS": "43200",
        "BUSY_GUARD_MAX_WAIT_RESULT": "CONTINUE",
        "BUSY_GUARD_CLOCK_SKEW_SECONDS": "30",
        "BUSY_GUARD_LEGACY_STALE_SECONDS": "21600",
        "BUSY_GUARD_RECONCILE_INTERVAL_SECONDS": "60",
        "BUSY_GUARD_RELEASED_TTL_SECONDS": "604800",
        "BUSY_GUARD_ACCOUNT_ID": {"Ref": "AWS::AccountId"},
        "BUSY_GUARD_OBSERVE_ONLY": "false",
        "BUSY_GUARD_KEY_SCHEME": "isolated",
        "BUSY_GUARD_READ_LEGACY_KEYS": "false",
        "BUSY_GUARD_PARTITION": {"Ref": "AWS::Partition"},
        "POWERTOOLS_SERVICE_NAME": "busy-guard",
        "POWERTOOLS_METRICS_NAMESPACE": "BusyGuard",
        "POWERTOOLS_LOG_LEVEL": "INFO",
    }


def test_the_handlers_own_config_accepts_the_synthesized_environment(
    template: Template, custom: Template
) -> None:
    guard_config = pytest.importorskip("busy_guard.guard.config")
    for synthesized in (template, custom):
        env = {
            **environment(synthesized),
            "BUSY_GUARD_TABLE": "busy_guard.instance_busy",
            "BUSY_GUARD_ACCOUNT_ID": "123456789012",  # what CloudFormation resolves AWS::AccountId to
            "BUSY_GUARD_PARTITION": "aws",  # and AWS::Partition
            "AWS_REGION": "eu-west-1",  # what Lambda sets
        }
        config = guard_config.GuardConfig.from_env(env)
        assert ",".join(config.asg_names) == env["BUSY_GUARD_ASG_NAMES"]
        # The items the guard marks are the ones the writers' policy lets each instance update.
        assert config.keys.key("i-0123456789abcdef0") == (
            "arn:aws:ec2:eu-west-1:123456789012:instance/i-0123456789abcdef0"
            if env["BUSY_GUARD_KEY_SCHEME"] == "isolated"
            else "i-0123456789abcdef0"
        )


def test_failed_async_invocations_are_not_retried_and_go_to_a_queue(template: Template) -> None:
    """The next tick is the retry; Lambda's own async retries would only replay an old event."""
    template.has_resource_properties(
        "AWS::Lambda::EventInvokeConfig",
        {
            "MaximumRetryAttempts": 0,
            "MaximumEventAgeInSeconds": 900,
            "DestinationConfig": {
                "OnFailure": {
                    "Destination": {"Fn::GetAtt": [Match.string_like_regexp("InvokeFailureQueue"), "Arn"]}
                }
            },
        },
    )


def test_code_asset_leaves_out_tests_caches_and_the_sandbox(tmp_path: Path) -> None:
    source = tmp_path / "lambdas"
    for relative in (
        "busy_guard/__init__.py",
        "busy_guard/guard/handler.py",
        "busy_guard/guard/__pycache__/handler.cpython-313.pyc",
        "busy_guard/stray.pyc",
        "busy_guard/sandbox/__init__.py",
        "busy_guard/tests/test_inner.py",
        "busy_guard.egg-info/PKG-INFO",
        "tests/test_outer.py",
    ):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text("# test\n")
    app = App(outdir=str(tmp_path / "out"))
    stack = Stack(app, "AssetOnly")
    lambda_.Function(
        stack,
        "Fn",
        runtime=lambda_.Runtime.PYTHON_3_13,
        handler="busy_guard.guard.handler.handler",
        code=lambda_.Code.from_asset(str(source), exclude=list(ASSET_EXCLUDES)),
    )
    assembly = app.synth()
    manifest = json.loads((Path(assembly.directory) / "AssetOnly.assets.json").read_text())
    (staged,) = [
        f["source"]["path"] for f in manifest["files"].values() if f["source"].get("packaging") == "zip"
    ]
    files = sorted(
        str(p.relative_to(Path(assembly.directory) / staged))
        for p in (Path(assembly.directory) / staged).rglob("*")
        if p.is_file()
    )
    assert files == ["busy_guard/__init__.py", "busy_guard/guard/handler.py"]


# --- the triggers ----------------------------------------------------------------------------------
def test_lifecycle_rule_matches_source_detail_type_groups_and_hook(template: Template) -> None:
    function_id = logical_id(template, "AWS::Lambda::Function")
    template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.autoscaling"],
                "detail-type": ["EC2 Instance-terminate Lifecycle Action"],
                "detail": {"AutoScalingGroupName": ["my-graph-db-asg"], "LifecycleHookName": ["busy-guard"]},
            },
            "Targets": [
                {
                    "Arn": {"Fn::GetAtt": [function_id, "Arn"]},
                    "Id": Match.any_value(),
                    "DeadLetterConfig": {
                        "Arn": {"Fn::GetAtt": [Match.string_like_regexp("EventTargetDlq"), "Arn"]}
                    },
                    "RetryPolicy": {"MaximumRetryAttempts": 20, "MaximumEventAgeInSeconds": 3600},
                }
            ],
        },
    )


def test_custom_rule_names_every_group_and_the_custom_hook(custom: Template) -> None:
    custom.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "detail": {
                    "AutoScalingGroupName": ["graph-a", "graph-b"],
                    "LifecycleHookName": ["graph-guard"],
                }
            }
        },
    )
    assert environment(custom)["BUSY_GUARD_ASG_NAMES"] == "graph-a,graph-b"
    assert environment(custom)["BUSY_GUARD_MAX_WAIT_RESULT"] == "ABANDON"


def test_one_minute_schedule_with_its_dead_letter_queue(template: Template) -> None:
    template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "ScheduleExpression": "rate(1 minute)",
            "Targets": [
                {
                    "Arn": {"Fn::GetAtt": [logical_id(template, "AWS::Lambda::Function"), "Arn"]},
                    "Id": Match.any_value(),
                    "DeadLetterConfig": {
                        "Arn": {"Fn::GetAtt": [Match.string_like_regexp("EventTargetDlq"), "Arn"]}
                    },
                    "RetryPolicy": {"MaximumRetryAttempts": 2, "MaximumEventAgeInSeconds": 60},
                }
            ],
        },
    )
    template.resource_count_is("AWS::Lambda::Permission", 2)


def test_stream_source_is_filtered_to_draining_items_with_bisect_retries_and_on_failure(
    template: Template,
) -> None:
    _, mapping = only(template, "AWS::Lambda::EventSourceMapping")
    props = mapping["Properties"]
    assert props["EventSourceArn"] == {
        "Fn::GetAtt": [logical_id(template, "AWS::DynamoDB::Table"), "StreamArn"]
    }
    (only_filter,) = props["FilterCriteria"]["Filters"]
    assert json.loads(only_filter["Pattern"]) == schema.stream_filter_pattern()
    assert props["BisectBatchOnFunctionError"] is True
    assert props["MaximumRetryAttempts"] == 5
    assert props["MaximumRecordAgeInSeconds"] == 3600
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["StartingPosition"] == "LATEST"
    assert props["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0].startswith(
        "GuardStreamFailureQueue"
    )


def test_queues_are_encrypted_retained_14_days_and_refuse_plain_http(template: Template) -> None:
    queues = template.find_resources("AWS::SQS::Queue")
    assert len(queues) == 3
    for queue in queues.values():
        assert queue["Properties"] == {"MessageRetentionPeriod": 14 * 24 * 3600, "SqsManagedSseEnabled": True}
    for queue_id in queues:
        template.has_resource_properties(
            "AWS::SQS::QueuePolicy",
            {
                "Queues": [{"Ref": queue_id}],
                "PolicyDocument": {
                    "Statement": Match.array_with(
                        [
                            {
                                "Action": "sqs:*",
                                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                                "Effect": "Deny",
                                "Principal": {"AWS": "*"},
                                "Resource": {"Fn::GetAtt": [queue_id, "Arn"]},
                            }
                        ]
                    )
                },
            },
        )


# --- the hooks -------------------------------------------------------------------------------------
def test_a_terminating_hook_on_each_named_group_created_after_the_guard(template: Template) -> None:
    _, hook = only(template, "AWS::AutoScaling::LifecycleHook")
    assert hook["Properties"] == {
        "AutoScalingGroupName": "my-graph-db-asg",
        "LifecycleHookName": "busy-guard",
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        "HeartbeatTimeout": 900,
        "DefaultResult": "CONTINUE",
    }
    depends_on = set(hook["DependsOn"])
    assert logical_id(template, "AWS::Lambda::Function") in depends_on
    assert logical_id(template, "AWS::Lambda::EventSourceMapping") in depends_on
    assert set(template.find_resources("AWS::Events::Rule")) <= depends_on
    assert set(template.find_resources("AWS::Lambda::Permission")) <= depends_on


def test_custom_hooks_carry_the_configured_timeout_and_result(custom: Template) -> None:
    hooks = custom.find_resources("AWS::AutoScaling::LifecycleHook")
    assert sorted(h["Properties"]["AutoScalingGroupName"] for h in hooks.values()) == ["graph-a", "graph-b"]
    for hook in hooks.values():
        assert hook["Properties"]["HeartbeatTimeout"] == 600
        assert hook["Properties"]["DefaultResult"] == "ABANDON"
        assert hook["Properties"]["LifecycleHookName"] == "graph-guard"


# --- IAM -------------------------------------------------------------------------------------------
def test_guard_role_has_no_managed_policies(template: Template) -> None:
    _, role = only(template, "AWS::IAM::Role")
    assert "ManagedPolicyArns" not in role["Properties"]
    assert role["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "lambda.amazonaws.com"
    }


def test_wildcard_resources_only_for_actions_that_support_nothing_else(template: Template) -> None:
    wildcard_actions: set[str] = set()
    for statement in statements(template):
        resources = (
            statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        )
        if "*" in resources:
            wildcard_actions |= actions_of(statement)
    assert wildcard_actions == {
        "autoscaling:DescribeAutoScalingGroups",
        # the tick reads our hook's real timeout, and the warm pools' instances
        "autoscaling:DescribeLifecycleHooks",
        "autoscaling:DescribeWarmPool",
        "dynamodb:ListStreams",
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
    }
    for statement in statements(template):
        assert all("*" not in action for action in actions_of(statement)), statement


def test_lifecycle_actions_only_on_the_guarded_groups(template: Template, custom: Template) -> None:
    statement = guard_statement(template, "autoscaling:CompleteLifecycleAction")
    assert actions_of(statement) == {
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
    }
    assert statement["Resource"] == {
        "Fn::Join": ["", [*GROUP_ARN_PREFIX, ":autoScalingGroup:*:autoScalingGroupName/my-graph-db-asg"]]
    }
    resources = guard_statement(custom, "autoscaling:RecordLifecycleActionHeartbeat")["Resource"]
    assert [r["Fn::Join"][1][-1] for r in resources] == [
        ":autoScalingGroup:*:autoScalingGroupName/graph-a",
        ":autoScalingGroup:*:autoScalingGroupName/graph-b",
    ]


def test_put_events_only_on_the_default_bus(template: Template) -> None:
    statement = guard_statement(template, "events:PutEvents")
    assert actions_of(statement) == {"events:PutEvents"}
    assert statement["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":events:",
                {"Ref": "AWS::Region"},
                ":",
                {"Ref": "AWS::AccountId"},
                ":event-bus/default",
            ],
        ]
    }


def test_observe_only_from_context_reaches_the_function() -> None:
    config = BusyGuardConfig.from_context({"asgNames": ["g"], "observeOnly": "true"}.get)
    assert config.settings.observe_only is True


def test_table_actions_only_on_the_table_and_stream_reads_only_on_its_stream(template: Template) -> None:
    table_id = logical_id(template, "AWS::DynamoDB::Table")
    items = guard_statement(template, "dynamodb:UpdateItem")
    assert actions_of(items) == {
        "dynamodb:BatchGetItem",
        "dynamodb:UpdateItem",
        "dynamodb:Scan",
    }
    assert items["Resource"] == {"Fn::GetAtt": [table_id, "Arn"]}
    stream = guard_statement(template, "dynamodb:GetRecords")
    assert actions_of(stream) == {
        "dynamodb:DescribeStream",
        "dynamodb:GetRecords",
        "dynamodb:GetShardIterator",
    }
    assert stream["Resource"] == {"Fn::GetAtt": [table_id, "StreamArn"]}
    every_dynamodb_action = set().union(
        *(
            actions_of(s)
            for s in statements(template)
            if any(a.startswith("dynamodb:") for a in actions_of(s))
        )
    )
    assert not every_dynamodb_action & {
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:DeleteItem",
        "dynamodb:Query",
    }


def test_logs_and_queues_only_on_their_own_resources(template: Template) -> None:
    logs = guard_statement(template, "logs:PutLogEvents")
    assert logs["Resource"] == {"Fn::GetAtt": [logical_id(template, "AWS::Logs::LogGroup"), "Arn"]}
    send = guard_statement(template, "sqs:SendMessage")
    assert sorted(r["Fn::GetAtt"][0].split("Queue")[0] for r in send["Resource"]) == [
        "GuardInvokeFailure",
        "GuardStreamFailure",
    ]


def managed_policy(template: Template, prefix: str) -> tuple[str, dict[str, Any]]:
    (found,) = [
        (resource_id, resource)
        for resource_id, resource in template.find_resources("AWS::IAM::ManagedPolicy").items()
        if resource_id.startswith(prefix)
    ]
    return found


OWN_ITEM_ONLY = {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["${ec2:SourceInstanceARN}"]}}


def writer_statements(template: Template, prefix: str = "WriterPolicy") -> dict[str, dict[str, Any]]:
    _, policy = managed_policy(template, prefix)
    document = policy["Properties"]["PolicyDocument"]
    assert document["Version"] == "2012-10-17"  # policy variables need it
    return {statement["Sid"]: statement for statement in document["Statement"]}


def guard_table_arn(template: Template) -> Any:
    return guard_statement(template, "dynamodb:Scan")["Resource"]


def test_writer_policy_is_update_item_on_the_own_item_only_and_exported(template: Template) -> None:
    """Isolated (a created table): an instance's credentials update only the item keyed by its ARN."""
    writer_id, _ = managed_policy(template, "WriterPolicy")
    table_arn = {"Fn::GetAtt": [logical_id(template, "AWS::DynamoDB::Table"), "Arn"]}
    assert writer_statements(template)["BusyGuardLeaseWrites"] == {
        "Sid": "BusyGuardLeaseWrites",
        "Effect": "Allow",
        "Action": "dynamodb:UpdateItem",
        "Resource": table_arn,
        "Condition": OWN_ITEM_ONLY,
    }
    template.has_output(
        "WriterPolicyArn",
        {
            "Value": {"Ref": writer_id},
            "Export": {"Name": "BusyGuard-WriterPolicyArn"},
        },
    )
    template.has_output(
        "TableName",
        {
            "Value": {"Ref": logical_id(template, "AWS::DynamoDB::Table")},
            "Export": {"Name": "BusyGuard-TableName"},
        },
    )


def test_writers_are_refused_plain_http_under_both_schemes(template: Template, custom: Template) -> None:
    created_arn = {"Fn::GetAtt": [logical_id(template, "AWS::DynamoDB::Table"), "Arn"]}
    imported_arn = guard_table_arn(custom)
    imported_prefix = imported_arn["Fn::Join"][1][:-1]  # CDK flattens the imported ARN + "/*"
    imported_children = {"Fn::Join": ["", [*imported_prefix, ":table/busy_guard.instance_busy/*"]]}
    for synthesized, table_arn, children in (
        (template, created_arn, {"Fn::Join": ["", [created_arn, "/*"]]}),
        (custom, imported_arn, imported_children),
    ):
        assert writer_statements(synthesized)["DenyPlainHttp"] == {
            "Sid": "DenyPlainHttp",
            "Effect": "Deny",
            "Action": "dynamodb:*",
            "Resource": [table_arn, children],  # the table, and its stream and indexes
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }


def test_the_legacy_scheme_has_no_leading_keys_condition_and_says_so(custom: Template) -> None:
    """An imported table defaults to legacy: bare ids, which no IAM condition can name."""
    _, policy = managed_policy(custom, "WriterPolicy")
    lease_writes = writer_statements(custom)["BusyGuardLeaseWrites"]
    assert lease_writes["Action"] == "dynamodb:UpdateItem"
    assert lease_writes["Resource"] == guard_table_arn(custom)
    assert "Condition" not in lease_writes
    assert "any writer can update any instance's item" in policy["Properties"]["Description"]
    assert "LeadingKeys" not in json.dumps(custom.to_json())


def test_the_key_scheme_is_an_output_for_the_writers_deploys(template: Template, custom: Template) -> None:
    template.has_output("KeyScheme", {"Value": "isolated", "Export": {"Name": "BusyGuard-KeyScheme"}})
    custom.has_output("KeyScheme", {"Value": "legacy"})


@pytest.fixture(scope="module")
def migrated() -> Template:
    """Migration step 3 on the imported table: isolated, bare-id items no longer read."""
    _, stack = build_app({**CUSTOM, "keyScheme": "isolated", "readLegacyKeys": "false"})
    return Template.from_stack(stack)


def condition_check_statements(template: Template) -> list[dict[str, Any]]:
    return [s for s in statements(template) if "dynamodb:ConditionCheckItem" in actions_of(s)]


def test_condition_check_item_only_while_legacy_keys_are_read(
    template: Template, custom: Template, migrated: Template, migrating: Template
) -> None:
    """The release proves the bare-id companion idle in its TransactWriteItems (a ConditionCheck)."""
    (check,) = condition_check_statements(migrating)
    assert actions_of(check) == {"dynamodb:ConditionCheckItem"}
    # the imported table's own ARN, nothing wider
    assert check["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":dynamodb:",
                {"Ref": "AWS::Region"},
                ":",
                {"Ref": "AWS::AccountId"},
                ":table/busy_guard.instance_busy",
            ],
        ]
    }
    assert condition_check_statements(template) == []  # a created table: no bare-id item to prove
    assert condition_check_statements(custom) == []  # legacy
    assert condition_check_statements(migrated) == []  # isolated, readLegacyKeys=false


def test_the_function_is_told_the_key_scheme(custom: Template, migrated: Template) -> None:
    scheme = ("BUSY_GUARD_KEY_SCHEME", "BUSY_GUARD_READ_LEGACY_KEYS")
    legacy, isolated = environment(custom), environment(migrated)
    assert (legacy[scheme[0]], legacy[scheme[1]]) == ("legacy", "false")
    assert (isolated[scheme[0]], isolated[scheme[1]]) == ("isolated", "false")
    assert isolated["BUSY_GUARD_PARTITION"] == {"Ref": "AWS::Partition"}
    # an explicit scheme wins over the imported table's default, in the writers' policy too
    assert writer_statements(migrated)["BusyGuardLeaseWrites"]["Condition"] == OWN_ITEM_ONLY
    migrated.has_output("KeyScheme", {"Value": "isolated"})


@pytest.fixture(scope="module")
def migrating() -> Template:
    """Migration step 2 on the imported table: isolated, bare-id items still read and still written."""
    _, stack = build_app({**CUSTOM, "keyScheme": "isolated"})
    return Template.from_stack(stack)


def test_while_migrating_writers_not_yet_rolled_keep_their_bare_id_leases(migrating: Template) -> None:
    """ARN items stay each instance's own; bare-id items stay open until readLegacyKeys=false."""
    lease_writes = writer_statements(migrating)["BusyGuardLeaseWrites"]
    assert lease_writes["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["${ec2:SourceInstanceARN}", "i-*"]}
    }
    _, policy = managed_policy(migrating, "WriterPolicy")
    assert "bare-id items open to every writer" in policy["Properties"]["Description"]
    assert len(condition_check_statements(migrating)) == 1
    assert environment(migrating)["BUSY_GUARD_READ_LEGACY_KEYS"] == "true"


def test_the_writer_policy_refuses_an_unknown_scheme_or_legacy_writers_under_legacy() -> None:
    stack = Stack(App(), "Writers")
    table = BusyTable(stack, "Table").table
    with pytest.raises(ValueError, match="key_scheme must be one of isolated, legacy; got 'arn'"):
        WriterPolicy(stack, "Bad", table=table, key_scheme="arn")
    with pytest.raises(ValueError, match="legacy_writers is the isolated scheme's migration step"):
        WriterPolicy(stack, "Both", table=table, key_scheme="legacy", legacy_writers=True)


def test_the_environment_size_counts_an_unresolved_partition_at_its_bound() -> None:
    """Synth refuses an environment over Lambda's 4 KB: a partition token counts 32 bytes, not 255."""
    partition = Stack(App(), "Sizes").partition
    base = {"BUSY_GUARD_ASG_NAMES": "g", "BUSY_GUARD_PARTITION": partition, "FILLER": ""}
    used = sum(len(key) for key in base) + len("g") + PARTITION_NAME_MAX_LENGTH
    at_limit = {**base, "FILLER": "x" * (4096 - used)}
    assert size_problems(["g"], at_limit, hook_name="h") == ([], [])
    errors, _ = size_problems(["g"], {**at_limit, "FILLER": at_limit["FILLER"] + "x"}, hook_name="h")
    assert errors == [
        "the guard function's environment would be 4097 bytes, over AWS's limit of 4096: "
        "guard fewer groups per stack, or shorter names"
    ]


# --- alarms ----------------------------------------------------------------------------------------
def alarm_metrics(template: Template) -> dict[str, dict[str, Any]]:
    """Alarms by metric name; the queue-depth alarms as ``ApproximateNumberOfMessagesVisible:<queue id>``."""
    by_name: dict[str, dict[str, Any]] = {}
    for alarm in template.find_resources("AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        name = props["MetricName"]
        if props["Dimensions"][0]["Name"] == "QueueName":
            name += ":" + props["Dimensions"][0]["Value"]["Fn::GetAtt"][0]
        by_name[name] = props
    return by_name


def test_alarms_on_errors_dlq_depth_iterator_age_and_max_wait(template: Template) -> None:
    alarms = alarm_metrics(template)
    assert sorted(name.split(":")[0] for name in alarms) == [
        "ApproximateNumberOfMessagesVisible",
        "ApproximateNumberOfMessagesVisible",
        "ApproximateNumberOfMessagesVisible",
        "Errors",
        "IteratorAge",
        "MaxWaitExceeded",
    ]
    function_dimension = [
        {"Name": "FunctionName", "Value": {"Ref": logical_id(template, "AWS::Lambda::Function")}}
    ]
    assert alarms["Errors"]["Dimensions"] == function_dimension
    assert (alarms["Errors"]["Statistic"], alarms["Errors"]["Threshold"]) == ("Sum", 1)
    assert alarms["IteratorAge"]["Dimensions"] == function_dimension
    assert (alarms["IteratorAge"]["Statistic"], alarms["IteratorAge"]["Threshold"]) == ("Maximum", 300_000)
    max_wait = alarms["MaxWaitExceeded"]
    assert max_wait["Namespace"] == "BusyGuard"
    assert max_wait["Dimensions"] == [{"Name": "service", "Value": "busy-guard"}]
    assert (max_wait["Statistic"], max_wait["Threshold"]) == ("Sum", 1)
    depth = [alarm for name, alarm in alarms.items() if name.startswith("Approximate")]
    assert {tuple(a["Dimensions"][0]["Value"]["Fn::GetAtt"]) for a in depth} == {
        (queue_id, "QueueName") for queue_id in template.find_resources("AWS::SQS::Queue")
    }
    for alarm in alarms.values():
        assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert alarm["TreatMissingData"] == "notBreaching"
        assert len(alarm["AlarmDescription"]) > 60
        assert "AlarmActions" not in alarm


def test_alarms_notify_the_configured_topic(custom: Template) -> None:
    alarms = custom.find_resources("AWS::CloudWatch::Alarm")
    assert len(alarms) == 6
    for alarm in alarms.values():
        assert alarm["Properties"]["AlarmActions"] == [TOPIC_ARN]
        assert alarm["Properties"]["OKActions"] == [TOPIC_ARN]
    custom.has_resource("AWS::Logs::LogGroup", {"DeletionPolicy": "Delete"})


# --- AutoScalingGroup objects ----------------------------------------------------------------------
def test_groups_given_as_cdk_objects_get_the_same_hook_iam_and_pattern(team: Template) -> None:
    group_id = logical_id(team, "AWS::AutoScaling::AutoScalingGroup")
    _, hook = only(team, "AWS::AutoScaling::LifecycleHook")
    assert hook["Properties"] == {
        "AutoScalingGroupName": {"Ref": group_id},
        "LifecycleHookName": "busy-guard",
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        "HeartbeatTimeout": 300,
        "DefaultResult": "CONTINUE",
    }
    assert "RoleARN" not in hook["Properties"]
    assert any(d.startswith("BusyGuardFunction") for d in hook["DependsOn"])
    assert guard_statement(team, "autoscaling:CompleteLifecycleAction")["Resource"] == {
        "Fn::Join": ["", [*GROUP_ARN_PREFIX, ":autoScalingGroup:*:autoScalingGroupName/", {"Ref": group_id}]]
    }
    team.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "detail": {"AutoScalingGroupName": [{"Ref": group_id}], "LifecycleHookName": ["busy-guard"]}
            }
        },
    )
    assert environment(team)["BUSY_GUARD_ASG_NAMES"] == {"Ref": group_id}
    instance_role = [
        role
        for role in team.find_resources("AWS::IAM::Role").values()
        if "ec2.amazonaws.com" in json.dumps(role)
    ]
    writers_id, _ = managed_policy(team, "Writers")
    assert instance_role[0]["Properties"]["ManagedPolicyArns"] == [{"Ref": writers_id}]


def test_the_construct_refuses_no_groups_and_a_table_without_stream() -> None:
    app = App()
    stack = Stack(app, "Refusals")
    table = BusyTable(stack, "Table").table
    with pytest.raises(ConfigError, match="asgNames must name at least one"):
        BusyGuard(stack, "NoGroups", table=table)
    no_stream = dynamodb.Table.from_table_name(stack, "Plain", "plain")
    with pytest.raises(ConfigError, match="must have a stream"):
        BusyGuard(stack, "NoStream", table=no_stream, group_names=["g"])


# --- cdk-nag ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stack_fixture", ["default_stack", "custom_stack"])
def test_aws_solutions_and_serverless_packs_have_no_errors_and_no_warnings(
    stack_fixture: str, request: pytest.FixtureRequest
) -> None:
    stack = request.getfixturevalue(stack_fixture)
    Template.from_stack(stack)  # synthesize, so the nag aspect has run
    annotations = Annotations.from_stack(stack)
    errors = annotations.find_error("*", NAG_ERRORS)
    warnings = annotations.find_warning("*", NAG_ERRORS)
    assert errors == [], [e.entry.data for e in errors]
    assert warnings == [], [w.entry.data for w in warnings]


def test_every_suppression_is_narrow_and_has_a_reviewable_reason(template: Template) -> None:
    suppressions: list[tuple[str, dict[str, Any]]] = []
    for resource_id, resource in template.to_json()["Resources"].items():
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", []):
            suppressions.append((resource_id, rule))
    assert {rule["id"] for _, rule in suppressions} == {
        "AwsSolutions-IAM5",
        "AwsSolutions-SQS3",
        "AwsSolutions-L1",
        "Serverless-SQSRedrivePolicy",
        "Serverless-LambdaLatestVersion",
        "Serverless-LambdaDLQ",
    }
    for resource_id, rule in suppressions:
        assert len(rule["reason"]) >= 120, (resource_id, rule)
        if rule["id"] == "AwsSolutions-IAM5":
            assert rule.get("applies_to"), f"IAM5 on {resource_id} must name the findings it accepts"
