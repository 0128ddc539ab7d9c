#!/usr/bin/env bash
echo "demo: not yet" >&2; exit 1
