"""What the CDK tests share: the app's context from ``cdk.json`` and a team's own stack with one
AutoScalingGroup object, built the same way wherever a test guards a group directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aws_cdk import App, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2

ROOT = Path(__file__).resolve().parents[1]
CDK_JSON: dict[str, Any] = json.loads((ROOT / "cdk.json").read_text())
CONTEXT: dict[str, Any] = CDK_JSON["context"]
FEATURE_FLAGS = {key: value for key, value in CONTEXT.items() if key.startswith("@aws-cdk")}
AMI = "ami-0123456789abcdef0"


def team_stack(*, ami: str = AMI, **group_options: Any) -> tuple[Stack, autoscaling.AutoScalingGroup]:
    """A team's stack (no lookups: an imported VPC, a generic AMI) and its group."""
    app = App(context=FEATURE_FLAGS)
    stack = Stack(app, "TeamStack")
    vpc = ec2.Vpc.from_vpc_attributes(
        stack,
        "Vpc",
        vpc_id="vpc-0123456789abcdef0",
        availability_zones=["eu-west-1a"],
        public_subnet_ids=["subnet-0123456789abcdef0"],
        public_subnet_route_table_ids=["rtb-0123456789abcdef0"],
    )
    group = autoscaling.AutoScalingGroup(
        stack,
        "GraphDb",
        vpc=vpc,
        vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
        instance_type=ec2.InstanceType("t4g.small"),
        machine_image=ec2.MachineImage.generic_linux({"eu-west-1": ami}),
        **group_options,
    )
    return stack, group
