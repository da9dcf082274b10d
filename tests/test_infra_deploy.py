"""`cdk deploy` that really guards: the update-policy judgement, the runnable example with a changed
AMI, the three partitions, the dependencies layer, the operator policy, the dashboard, the synth-time
limits and warnings, and cfn-lint on every synthesized template.

Each app is synthesized once per module (jsii start-up and synth cost seconds).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _cdk_support import AMI, CONTEXT, FEATURE_FLAGS, ROOT, team_stack
from aws_cdk import App, CfnAutoScalingReplacingUpdate, CfnUpdatePolicy, Environment, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk.assertions import Annotations, Match, Template
from cfnlint.api import ManualArgs, lint

from busy_guard.cli import release, status
from busy_guard.guard.observability import MetricName
from busy_guard_infra.application import add_nag_packs, build_app
from busy_guard_infra.config import BusyGuardConfig, ConfigError
from busy_guard_infra.constants import LAMBDA_DEPS_DIR, LAMBDA_REQUIREMENTS
from busy_guard_infra.constructs.guard import BusyGuard
from busy_guard_infra.constructs.table import BusyTable
from busy_guard_infra.stack import BusyGuardStack

NAG = Match.string_like_regexp("(AwsSolutions|Serverless)-.*")
AMI_BEFORE = AMI
AMI_AFTER = "ami-0fedcba9876543210"
PARTITIONS = {"aws": "eu-west-1", "aws-cn": "cn-north-1", "aws-us-gov": "us-gov-west-1"}


def load_example() -> ModuleType:
    path = ROOT / "examples" / "guarded_group" / "guarded_group_app.py"
    spec = importlib.util.spec_from_file_location("guarded_group_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def only(template: Template, resource_type: str) -> tuple[str, dict[str, Any]]:
    resources = template.find_resources(resource_type)
    assert len(resources) == 1, f"expected one {resource_type}, found {sorted(resources)}"
    return next(iter(resources.items()))


def lint_errors(template: Template, region: str = "eu-west-1") -> list[str]:
    matches = lint(json.dumps(template.to_json()), config=ManualArgs(regions=[region]))
    return [f"{m.rule.id} {m.message} ({'/'.join(map(str, m.path))})" for m in matches if m.rule.id[0] == "E"]


def nag_findings(stack: Stack) -> list[Any]:
    annotations = Annotations.from_stack(stack)
    return [f.entry.data for f in annotations.find_error("*", NAG) + annotations.find_warning("*", NAG)]


# --- a team's stack with one group per update policy ----------------------------------------------
def guard(stack: Stack, group: autoscaling.IAutoScalingGroup, **options: Any) -> BusyGuard:
    table = BusyTable(stack, "BusyTable", table_name="team.instance_busy").table
    return BusyGuard(stack, "BusyGuard", table=table, groups=[group], **options)


def update_policy(template: Template) -> dict[str, Any]:
    _, group = only(template, "AWS::AutoScaling::AutoScalingGroup")
    return dict(group.get("UpdatePolicy", {}))


def test_a_replacing_update_is_refused_naming_the_group_and_the_fix() -> None:
    stack, group = team_stack(update_policy=autoscaling.UpdatePolicy.replacing_update())
    with pytest.raises(ConfigError) as refused:
        guard(stack, group)
    message = str(refused.value)
    assert "TeamStack/GraphDb has UpdatePolicy AutoScalingReplacingUpdate" in message
    assert "terminates its instances without waiting for the busy-guard hook" in message
    assert "UpdatePolicy.instance_refresh(min_healthy_percentage=100, max_healthy_percentage=110)" in message


def test_a_replacing_update_set_after_the_guard_still_fails_synth() -> None:
    stack, group = team_stack()
    guard(stack, group)
    cfn = group.node.default_child
    assert isinstance(cfn, autoscaling.CfnAutoScalingGroup)
    cfn.cfn_options.update_policy = CfnUpdatePolicy(
        auto_scaling_replacing_update=CfnAutoScalingReplacingUpdate(will_replace=True)
    )
    with pytest.raises(RuntimeError, match="GraphDb has UpdatePolicy AutoScalingReplacingUpdate"):
        Template.from_stack(stack)


def test_a_rolling_update_is_guarded_with_a_warning_about_held_instances() -> None:
    stack, group = team_stack(update_policy=autoscaling.UpdatePolicy.rolling_update())
    guard(stack, group, add_instance_refresh=True)  # never overrides a policy the team chose
    template = Template.from_stack(stack)
    assert "AutoScalingRollingUpdate" in update_policy(template)
    assert "AutoScalingInstanceRefresh" not in update_policy(template)
    warnings = Annotations.from_stack(stack).find_warning(
        "/TeamStack/GraphDb", Match.string_like_regexp("won't wait for instances that busy-guard holds")
    )
    assert len(warnings) == 1


def test_an_instance_refresh_is_accepted_with_the_hook_on_the_group() -> None:
    refresh = autoscaling.UpdatePolicy.instance_refresh(
        strategy=autoscaling.InstanceRefreshStrategy.ROLLING,
        min_healthy_percentage=100,
        max_healthy_percentage=150,
    )
    stack, group = team_stack(update_policy=refresh)
    guard(stack, group, add_instance_refresh=True)
    template = Template.from_stack(stack)
    assert update_policy(template)["AutoScalingInstanceRefresh"] == {
        "Strategy": "Rolling",
        "Preferences": {"MinHealthyPercentage": 100, "MaxHealthyPercentage": 150},  # the team's, kept
    }
    group_id, _ = only(template, "AWS::AutoScaling::AutoScalingGroup")
    _, hook = only(template, "AWS::AutoScaling::LifecycleHook")
    assert hook["Properties"]["AutoScalingGroupName"] == {"Ref": group_id}
    assert hook["Properties"]["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert Annotations.from_stack(stack).find_warning("*", Match.string_like_regexp("RollingUpdate")) == []


def test_the_opt_in_sets_a_launch_before_terminate_refresh_where_there_is_none() -> None:
    stack, group = team_stack()
    guard(stack, group, add_instance_refresh=True)
    template = Template.from_stack(stack)
    policy = update_policy(template)
    assert policy["AutoScalingInstanceRefresh"] == {
        "Strategy": "Rolling",
        "Preferences": {"MinHealthyPercentage": 100, "MaxHealthyPercentage": 110},
    }
    assert policy["AutoScalingScheduledAction"] == {"IgnoreUnmodifiedGroupSizeProperties": True}  # kept

    plain_stack, plain_group = team_stack()
    guard(plain_stack, plain_group)  # without the opt-in, CDK's default stays: no instance refresh
    assert "AutoScalingInstanceRefresh" not in update_policy(Template.from_stack(plain_stack))


# --- the example app: a changed AMI is a refresh --------------------------------------------------
@pytest.fixture(scope="module")
def example_stacks() -> tuple[Stack, Stack]:
    example = load_example()
    _, before = example.build_app({**FEATURE_FLAGS, "exampleAmiId": AMI_BEFORE})
    _, after = example.build_app({**FEATURE_FLAGS, "exampleAmiId": AMI_AFTER})
    return before, after


@pytest.fixture(scope="module")
def example_templates(example_stacks: tuple[Stack, Stack]) -> tuple[Template, Template]:
    before, after = example_stacks
    return Template.from_stack(before), Template.from_stack(after)


def image_ids(template: Template) -> set[str]:
    return set(re.findall(r"ami-[0-9a-f]{17}", json.dumps(template.to_json())))


def test_the_second_ami_is_a_launch_template_change_that_cloudformation_answers_with_a_refresh(
    example_templates: tuple[Template, Template],
) -> None:
    before, after = example_templates
    assert (image_ids(before), image_ids(after)) == ({AMI_BEFORE}, {AMI_AFTER})
    lt_id, lt_before = only(before, "AWS::EC2::LaunchTemplate")
    _, lt_after = only(after, "AWS::EC2::LaunchTemplate")
    assert lt_before != lt_after  # a new launch template version ...
    for template in (before, after):
        group_id, group = only(template, "AWS::AutoScaling::AutoScalingGroup")
        # ... which the group follows, so the group's LaunchTemplate property changes ...
        assert group["Properties"]["LaunchTemplate"]["Version"] == {
            "Fn::GetAtt": [lt_id, "LatestVersionNumber"]
        }
        # ... and with this policy CloudFormation answers that change with an instance refresh.
        assert group["UpdatePolicy"]["AutoScalingInstanceRefresh"] == {
            "Strategy": "Rolling",
            "Preferences": {"MinHealthyPercentage": 100, "MaxHealthyPercentage": 110},
        }
        _, hook = only(template, "AWS::AutoScaling::LifecycleHook")
        assert hook["Properties"]["AutoScalingGroupName"] == {"Ref": group_id}
    # Nothing but the image changed: the guard, the hook and the table are the same resources.
    strip = {"AWS::EC2::LaunchTemplate"}
    assert {k for k, v in before.to_json()["Resources"].items() if v["Type"] not in strip} == {
        k for k, v in after.to_json()["Resources"].items() if v["Type"] not in strip
    }


def test_the_example_wires_the_writer_policy_to_the_instance_role(
    example_templates: tuple[Template, Template],
) -> None:
    template, _ = example_templates
    policies = template.find_resources("AWS::IAM::ManagedPolicy")
    (writers_id,) = [resource_id for resource_id in policies if resource_id.startswith("Writers")]
    (role,) = [
        r for r in template.find_resources("AWS::IAM::Role").values() if "ec2.amazonaws.com" in json.dumps(r)
    ]
    assert role["Properties"]["ManagedPolicyArns"] == [{"Ref": writers_id}]
    # a new table: the isolated scheme, each instance's credentials on its own item only
    (lease_writes,) = [
        statement
        for statement in policies[writers_id]["Properties"]["PolicyDocument"]["Statement"]
        if statement["Effect"] == "Allow"
    ]
    assert lease_writes["Action"] == "dynamodb:UpdateItem"
    assert lease_writes["Condition"] == {
        "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["${ec2:SourceInstanceARN}"]}
    }
    (guard_function,) = template.find_resources(
        "AWS::Lambda::Function", {"Properties": {"Handler": "busy_guard.guard.handler.handler"}}
    ).values()
    assert guard_function["Properties"]["Environment"]["Variables"]["BUSY_GUARD_KEY_SCHEME"] == "isolated"


def test_the_example_is_clean_for_cdk_nag_and_cfn_lint(
    example_stacks: tuple[Stack, Stack], example_templates: tuple[Template, Template]
) -> None:
    assert nag_findings(example_stacks[0]) == []
    assert lint_errors(example_templates[0]) == []


# --- every partition ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def partition_templates() -> dict[str, Template]:
    templates: dict[str, Template] = {}
    for partition, region in PARTITIONS.items():
        app = App(context=CONTEXT)
        config = BusyGuardConfig.from_context(app.node.try_get_context)
        stack = BusyGuardStack(
            app, "BusyGuard", config=config, env=Environment(account="123456789012", region=region)
        )
        add_nag_packs(app)
        templates[partition] = Template.from_stack(stack)
        assert nag_findings(stack) == [], partition
    return templates


@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_the_stack_synthesizes_for_each_partition_without_lookups_or_foreign_arns(
    partition: str, partition_templates: dict[str, Template]
) -> None:
    template = partition_templates[partition]
    text = json.dumps(template.to_json())
    literal_partitions = set(re.findall(r"arn:(aws[a-z-]*):", text))
    assert literal_partitions <= {partition}, literal_partitions
    assert "017000801446" not in text  # no public layer account, which differs by partition
    _, function = only(template, "AWS::Lambda::Function")
    layer_id, _ = only(template, "AWS::Lambda::LayerVersion")
    assert function["Properties"]["Layers"] == [{"Ref": layer_id}]
    # the guard builds the isolated scheme's keys, arn:PARTITION:ec2:..., from the stack's own partition
    assert function["Properties"]["Environment"]["Variables"]["BUSY_GUARD_PARTITION"] == partition
    assert lint_errors(template, PARTITIONS[partition]) == []
    assert not (ROOT / "cdk.context.json").exists()  # nothing was looked up


# --- the default app: cfn-lint, operator policy, dashboard, warnings -------------------------------
@pytest.fixture(scope="module")
def default() -> tuple[Stack, Template]:
    _, stack = build_app(CONTEXT)
    return stack, Template.from_stack(stack)


def test_cfn_lint_finds_no_errors_in_the_default_template(default: tuple[Stack, Template]) -> None:
    assert lint_errors(default[1]) == []


def calls_in(module: ModuleType) -> set[str]:
    """The boto3 calls a CLI module makes, as IAM actions (client.get_item -> GetItem)."""
    source = Path(module.__file__ or "").read_text()
    names = set(re.findall(r"\.(describe_auto_scaling_groups|describe_auto_scaling_instances)\b", source))
    return {"autoscaling:" + "".join(part.title() for part in name.split("_")) for name in names}


def test_the_operator_policy_is_exactly_what_status_and_release_call(default: tuple[Stack, Template]) -> None:
    _, template = default
    (policy,) = [
        p
        for resource_id, p in template.find_resources("AWS::IAM::ManagedPolicy").items()
        if resource_id.startswith("GuardOperatorPolicy")
    ]
    statements = {s["Sid"]: s for s in policy["Properties"]["PolicyDocument"]["Statement"]}
    actions = {
        sid: set([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        for sid, s in statements.items()
    }
    assert actions == {
        # status: get_many (BatchGetItem), draining_items/table scan (Scan); release: get, release
        "ReadAndRecordOnTheBusyTable": {
            "dynamodb:BatchGetItem",
            "dynamodb:Scan",
            "dynamodb:GetItem",
            "dynamodb:UpdateItem",
        },
        "CompleteTheGuardedHooks": {"autoscaling:CompleteLifecycleAction"},
        "DescribeNeedsWildcard": calls_in(status) | calls_in(release),
    }
    assert statements["DescribeNeedsWildcard"]["Resource"] == "*"
    assert statements["CompleteTheGuardedHooks"]["Resource"]["Fn::Join"][1][-1] == (
        ":autoScalingGroup:*:autoScalingGroupName/my-graph-db-asg"
    )
    template.has_output("OperatorPolicyArn", {"Export": {"Name": "BusyGuard-OperatorPolicyArn"}})


def test_the_dashboard_shows_what_an_operator_watches_during_a_refresh(
    default: tuple[Stack, Template],
) -> None:
    _, template = default
    _, dashboard = only(template, "AWS::CloudWatch::Dashboard")
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for title in (
        "Instances held in Terminating:Wait",
        "Hook wait until release (seconds)",
        "Releases by reason",
        "Errors",
        "Dead-letter queues (messages)",
        "Stream iterator age (ms)",
    ):
        assert title in body
    for metric in (
        MetricName.INSTANCES_WAITING,
        MetricName.HOOK_WAIT_SECONDS,
        MetricName.COMPLETED,
        MetricName.HEARTBEATS,
        "Errors",
        "ApproximateNumberOfMessagesVisible",
        "IteratorAge",
    ):
        assert f'\\"{metric}\\"' in body, metric
    for stat in ("p50", "p90", "Maximum"):
        assert f'\\"stat\\":\\"{stat}\\"' in body


def test_no_alarm_topic_is_a_synth_warning(default: tuple[Stack, Template]) -> None:
    stack, _ = default
    warning = Annotations.from_stack(stack).find_warning(
        "/BusyGuard/Guard", Match.string_like_regexp("the guard's alarms notify nobody")
    )
    assert len(warning) == 1
    _, with_topic = build_app({**CONTEXT, "alarmTopicArn": "arn:aws:sns:eu-west-1:123456789012:ops-alarms"})
    Template.from_stack(with_topic)
    assert (
        Annotations.from_stack(with_topic).find_warning("*", Match.string_like_regexp("notify nobody")) == []
    )


def test_the_rule_and_the_handler_accept_only_the_stacks_account(default: tuple[Stack, Template]) -> None:
    _, template = default
    template.has_resource_properties(
        "AWS::Events::Rule", {"EventPattern": {"account": [{"Ref": "AWS::AccountId"}]}}
    )


# --- synth-time size limits -----------------------------------------------------------------------
def test_too_many_group_names_for_the_event_pattern_fail_synth() -> None:
    names = [f"graph-db-{i:03d}-{'x' * 40}" for i in range(40)]  # ~2,100 characters of names
    with pytest.raises(
        ConfigError, match=r"the lifecycle rule's event pattern would be .* over AWS's limit of 2048"
    ):
        build_app({**CONTEXT, "asgNames": names})


def test_long_names_for_the_environment_fail_synth() -> None:
    names = [f"{i:02d}" + "n" * 250 for i in range(17)]  # 17 x 252 characters > 4 KB
    with pytest.raises(
        ConfigError, match=r"the guard function's environment would be .* over AWS's limit of 4096"
    ):
        build_app({**CONTEXT, "asgNames": names})


def test_group_names_known_only_at_deploy_are_a_warning() -> None:
    """Eight groups built in the same app: their names are tokens, counted at 255 characters each,
    which could exceed the pattern's 2,048; synth warns instead of refusing."""
    stack, first = team_stack()
    groups = [first] + [
        autoscaling.AutoScalingGroup(
            stack,
            f"Loader{i}",
            vpc=first.node.scope.node.find_child("Vpc"),  # type: ignore[union-attr]
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
            instance_type=ec2.InstanceType("t4g.small"),
            machine_image=ec2.MachineImage.generic_linux({"eu-west-1": AMI_BEFORE}),
        )
        for i in range(7)
    ]
    table = BusyTable(stack, "BusyTable").table
    BusyGuard(stack, "BusyGuard", table=table, groups=groups)
    Template.from_stack(stack)
    warnings = Annotations.from_stack(stack).find_warning(
        "/TeamStack/BusyGuard", Match.string_like_regexp("event pattern may be up to")
    )
    assert len(warnings) == 1
    one_stack, one = team_stack()
    guard(one_stack, one)
    Template.from_stack(one_stack)
    assert Annotations.from_stack(one_stack).find_warning("*", Match.string_like_regexp("may be up to")) == []


# --- the dependencies layer is what the tests run -------------------------------------------------
def pinned() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LAMBDA_REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_virtualenv_runs_the_versions_the_layer_ships() -> None:
    pins = pinned()
    assert pins["aws-lambda-powertools"] == "3.23.0"
    assert {name: importlib.metadata.version(name) for name in pins} == pins


def test_the_layer_holds_exactly_the_pinned_arm64_cp313_wheels() -> None:
    site = LAMBDA_DEPS_DIR / "python"
    installed = {}
    for dist_info in site.glob("*.dist-info"):
        name, version = dist_info.name.removesuffix(".dist-info").rsplit("-", 1)
        installed[normalized(name)] = version
    assert installed == {normalized(name): version for name, version in pinned().items()}
    (core,) = site.glob("pydantic_core/_pydantic_core.*.so")
    assert core.name.endswith("cpython-313-aarch64-linux-gnu.so")
