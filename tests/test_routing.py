"""The cluster's routing rules and job board, without Ray: which model ids a request needs, what the board answers
(these run where the cluster extra is not installed), and the scale-out simulation's verdicts."""

from __future__ import annotations

import os
import shutil

from conftest import MODEL, request, unit

from imprompt import Engine
from imprompt.cluster.board import JobBoard
from imprompt.cluster.routing import model_id, route
from tools.scale_sim import main as simulate_main
from tools.scale_sim import simulate


def test_a_request_needs_its_pipeline_and_one_encoder_id_per_encoded_unit(engine, red_circle, yellow_square):
    two = engine.plan(request(unit("ip-adapter_sd15", red_circle), unit("ip-adapter_sd15_vit-G", yellow_square),
                              unit("ip-adapter-plus_sd15", red_circle)))  # fmt: skip
    wanted = route(two)
    assert wanted.pipeline.startswith(f"{MODEL}@")
    assert sorted(wanted.encoders) == [0, 1, 2]
    assert wanted.encoders[0] == wanted.encoders[2] != wanted.encoders[1]  # ViT-H twice, bigG once
    assert route(engine.plan(request())).encoders == {}


def test_saved_and_given_embeddings_need_no_encoder_worker(engine, red_circle, tmp_path):
    saved = engine.save_embeddings(unit("ip-adapter_sd15", red_circle), tmp_path / "cat.safetensors")
    plan = engine.plan(request({"adapter": "ip-adapter_sd15", "embeddings": str(saved)}))
    assert route(plan).encoders == {}


def test_an_id_changes_when_its_file_does(pack, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(pack / "diffusers" / MODEL, folder / MODEL)
    engine = Engine(folder)
    before = model_id(engine.store.pipeline(MODEL))
    assert model_id(Engine(folder).store.pipeline(MODEL)) == before  # another process, the same id
    unet = next((folder / MODEL / "unet").glob("*.safetensors"))
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))
    engine.store.refresh()
    assert model_id(engine.store.pipeline(MODEL)) != before


def test_interrupt_stops_the_job_progress_shows_and_no_other():
    board = JobBoard()
    for job in (1, 2, 3):
        board.submit(job, [])
    board.started(2, "replica-a", 1)
    board.started(1, "replica-b", 1)  # job 2 started first: progress shows it
    assert board.progress()["state"]["job"] == "job 2"
    assert board.interrupt() is True
    assert board.step(2, 1, 10, 0) is True and board.step(1, 1, 10, 0) is False
    assert board.started(3, "replica-a", 1) is False  # waiting jobs go on


def test_a_job_its_client_left_stops_wherever_it_is():
    board = JobBoard()
    board.submit(1, [])
    board.submit(2, [])
    board.started(1, "replica-a", 1)
    board.finished(1)  # the ingress ended it: its client went away
    board.finished(2)
    assert board.step(1, 3, 10, 0) is True  # the running one stops at its next step
    assert board.started(2, "replica-a", 1) is True  # the waiting one never starts
    assert board.progress()["state"]["job_count"] == 0  # nothing lingers


def test_the_board_says_which_ids_a_replica_holds():
    board = JobBoard()
    board.report("a", {"kind": "generator", "held": ["tiny@1"]})
    board.report("b", {"kind": "encoder", "held": ["vit-h@2"]})
    assert board.submit(1, ["tiny@1", "sdxl@3", "vit-h@2"]) == ["tiny@1", "vit-h@2"]
    board.forget("a")
    assert board.submit(2, ["tiny@1"]) == []


def test_the_simulated_router_keeps_models_where_they_are(capsys):
    class Args:  # 8 replicas with room for 3 pipelines each, 20 pipelines with Zipf popularity, a sane load
        gpus, pipelines, models_per_worker, zipf, rate, requests = 8, 20, 3, 1.1, 1.5, 2000
        generate_s, load_s, max_ongoing = 2.0, 6.0, 4

    random_routing, ray, gated = (simulate(policy, Args, seed=0) for policy in ("random", "ray", "ray+gate"))
    assert ray["hit_rate"] > 0.95 > random_routing["hit_rate"]
    assert ray["loads_per_1000"] * 10 < random_routing["loads_per_1000"]
    assert gated["loads_per_1000"] <= ray["loads_per_1000"] + 1
    assert simulate_main(["--requests", "300"]) == 0 and "| ray+gate |" in capsys.readouterr().out
