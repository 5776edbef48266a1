"""
The two rules of docs/testing.md, kept by tests that read the code rather than trust a list:

1. Every flag that reads a path or a value has a bad-input test (missing, empty, wrong type,
   wrong kind of file).
   - A flag with a type (int, float, boolean, an image size) or a fixed set of choices is tested
     here for every script at once, from the scripts' own parsers: a wrong type and an empty value are refused by the
     parser in one line naming the flag. A new typed flag is covered without a line of its own.
   - A flag that takes text (a path, a name, a list) needs a row in TEXT_FLAG_TESTS naming the
     test(s) of its bad input. The table is checked against the parsers: a new text flag of any
     script without a row fails test_every_text_flag_has_a_bad_input_test, and so does a row
     naming a test that does not exist, or a flag no script has any more.
2. Every feature that writes files has an interruption test (a signal or a kill, a full disk, a
   second job). The features are found in the code: every function of the package and of the
   scripts that calls one of the writing primitives (WRITE_PRIMITIVES: atomic_write, the
   checkpoint writers, the grid writer, np.savez). Each must have a row in WRITING_FEATURES naming
   its interruption test; a new writer without one fails
   test_every_file_writing_feature_has_an_interruption_test.
"""

import argparse
import ast
import errno
import glob
import os
import sys

import numpy as np
import pytest

from test_scripts import REPO
from test_surfaces import MODEL, error_line, write_images

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")


def _parsers():
    sys.path.insert(0, os.path.join(REPO, "docs"))
    try:
        import generate_flags
    finally:
        sys.path.remove(os.path.join(REPO, "docs"))
    return generate_flags.script_parsers(REPO)


PARSERS = _parsers()


def _is_typed(action):
    kind = action.type
    return kind in (int, float) or getattr(kind, "__name__", "") in (
        "str2bool", "parse_image_size", "_image_size_arg")


def _takes_a_value(action):
    return not isinstance(action, argparse._HelpAction) and action.nargs != 0


# ----------------------------------------------------------------------------- rule 1: typed flags


@pytest.mark.parametrize("script", [path for path, _ in PARSERS])
def test_every_typed_flag_refuses_a_wrong_type_and_an_empty_value(script, capsys):
    parser = dict(PARSERS)[script]
    typed = [a for a in parser._actions if _takes_a_value(a) and a.option_strings
             and (_is_typed(a) or a.choices is not None)]
    for action in typed:
        flag = action.option_strings[0]
        for bad in ("not-a-value", ""):
            with pytest.raises(SystemExit) as stop:
                parser.parse_args([flag, bad])
            assert stop.value.code == 2, (script, flag, bad)
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"error: argument {flag}" in last, (script, flag, bad, last)


# ----------------------------------------------------------------------------- rule 1: text flags

# Flag (its dest) -> the tests of its bad input, "file::function". Each text-taking flag of
# every script (docs/generate_flags.SCRIPT_PATTERNS) has a row.
TEXT_FLAG_TESTS = {
    "checkpoint_dir": ["tests/test_reproduce.py::test_missing_inputs_are_named_with_what_to_download"],
    "extra_flags": ["tests/test_reproduce.py::test_missing_inputs_are_named_with_what_to_download"],
    "ref_dir": ["tests/test_reproduce.py::test_missing_inputs_are_named_with_what_to_download"],
    "row": ["tests/test_reproduce.py::test_missing_inputs_are_named_with_what_to_download"],
    "fid_ref": ["tests/test_proxy_fid.py::test_bad_fid_flags_are_refused_in_one_line_before_any_work"],
    "guidance_at": ["tests/test_guidance_at.py::test_classifier_sample_refuses_bad_guidance_at_before_any_work"],
    "arch": ["tests/test_vae.py::test_checkpoint_for_other_architecture_names_the_flag",
             "tests/test_cgan.py::test_mismatched_checkpoint_flags_give_one_clear_error"],
    "archive": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "attention_resolutions": [
        "tests/test_bad_input.py::test_an_image_size_the_levels_cannot_halve_is_one_line"],
    "base_samples": ["tests/test_scripts.py::test_base_samples_of_the_wrong_shape",
                     "tests/test_surfaces.py::test_n13_super_res_base_samples_name_their_flag"],
    "base_url": ["tests/test_released.py::test_cli_one_line_for_an_unknown_name_and_when_offline"],
    "budgets": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "channel_mult": [
        "tests/test_bad_input.py::test_an_image_size_the_levels_cannot_halve_is_one_line"],
    "classifier_attention_resolutions": [
        "tests/test_bad_input.py::test_files_that_hold_something_else_are_named"],
    "classifier_channel_mult": [
        "tests/test_bad_input.py::test_an_image_size_the_levels_cannot_halve_is_one_line"],
    "classifier_path": ["tests/test_bad_input.py::test_files_that_hold_something_else_are_named"],
    "classifier_pool": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "classifier_scales": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "cond_model_path": ["tests/test_guidance_sweep.py::test_guidance_sweep_end_to_end"],
    "config": ["tests/test_surfaces.py::test_n3_an_unreadable_record_is_one_line_naming_the_fix",
               "tests/test_runs.py::test_bad_configs_are_one_line"],
    "data_dir": ["tests/test_surfaces.py::test_n13_every_message_names_a_flag_the_script_has",
                 "tests/test_surfaces.py::test_n1_a_refused_start_leaves_args_json_as_it_was"],
    "device": ["tests/test_benchmarks.py::test_unknown_config_and_missing_gpu_are_one_line_errors"],
    "ema_rate": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "evaluations": ["tests/test_cfg.py::test_sampler_fid_bad_input",
                    "tests/test_editing.py::test_bad_input_is_one_line"],
    "features_npz": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "folder": ["tests/test_surfaces.py::test_n13_every_message_names_a_flag_the_script_has"],
    "guidance_scales": ["tests/test_cfg.py::test_sampler_fid_bad_input"],
    "inception_path": ["tests/test_evaluator.py::test_cli_errors_are_one_line",
                       "tests/test_inception.py::test_load_rejects_wrong_files"],
    "init_checkpoint": [
        "tests/test_runs.py::test_fine_tuning_refusals_are_one_line",
        "tests/test_surfaces.py::"
        "test_n9_a_file_of_another_kind_as_init_checkpoint_is_named_and_not_to_be_deleted"],
    "input": ["tests/test_ddim_scripts.py::test_image_folder_of_the_wrong_size",
              "tests/test_surfaces.py::test_n13_every_message_names_a_flag_the_script_has"],
    "latents": ["tests/test_ddim_scripts.py::test_latents_that_do_not_fit_the_model"],
    "likelihood": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "lmdb_path": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "log_dir": ["tests/test_faults.py::"
                "test_a_second_job_on_a_live_jobs_folder_is_refused_and_a_dead_job_leaves_no_lock"],
    "log_format": ["tests/test_runs.py::test_log_format_flag_and_the_environment_variable"],
    "lr_schedule": ["tests/test_lr_schedule.py::"
                    "test_bad_schedules_are_refused_in_one_line_before_any_work"],
    "mask": ["tests/test_editing.py::test_bad_input_is_one_line",
             "tests/test_surfaces.py::test_n13_every_message_names_a_flag_the_script_has"],
    "model_path": ["tests/test_bad_input.py::test_files_that_hold_something_else_are_named"],
    "names": ["tests/test_released.py::test_cli_one_line_for_an_unknown_name_and_when_offline"],
    "noise_schedule": ["tests/test_surfaces.py::"
                       "test_n2_a_number_for_a_text_flag_reads_as_its_text_and_then_meets_the_flags_checks"],
    "npz": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "optimizer": ["tests/test_cgan.py::test_mismatched_checkpoint_flags_give_one_clear_error"],
    "out_dir": ["tests/test_bad_input.py::test_an_unwritable_out_dir_is_refused_before_sampling"],
    "out_npz": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "prefix": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "ref_batch": ["tests/test_surfaces.py::test_n13_the_evaluators_batch_check_names_no_flag_it_lacks",
                  "tests/test_evaluator.py::test_cli_errors_are_one_line"],
    "resume_checkpoint": ["tests/test_surfaces.py::test_n1_a_refused_start_leaves_args_json_as_it_was"],
    "sample_batch": ["tests/test_surfaces.py::"
                     "test_n13_the_evaluators_batch_check_names_no_flag_it_lacks",
                     "tests/test_evaluator.py::test_cli_errors_are_one_line"],
    "sample_path": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "sampler": ["tests/test_cfg.py::test_sampler_fid_bad_input",
                "tests/test_surfaces.py::test_sampler_docs_and_help_name_every_sampler"],
    "samplers": ["tests/test_cfg.py::test_sampler_fid_bad_input"],
    "samples": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "scales": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "schedule_sampler": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "sigma_grid": ["tests/test_solvers.py::test_sampler_flag_resolution_and_make_sample_fn"],
    "steps": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "strengths": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "test_dir": ["tests/test_input_rules.py::test_text_flags_refuse_bad_input_in_one_line"],
    "timestep_respacing": ["tests/test_bad_input.py::test_files_that_hold_something_else_are_named"],
    "uncond_model_path": ["tests/test_guidance_sweep.py::test_guidance_sweep_end_to_end"],
    "dit_model": ["tests/test_dit_paths.py::test_bad_sampling_flags_one_line",
                  "tests/test_dit_paths.py::test_factory_refusals"],
    "guidance_channels": ["tests/test_dit_paths.py::test_bad_sampling_flags_one_line"],
    "lr_schedule": ["tests/test_lr_schedule.py::"
                    "test_bad_schedules_are_refused_in_one_line_before_any_work"],
    "save_format": ["tests/test_safetensors.py::test_bad_save_format_is_one_line_before_the_log_folder",
                    "tests/test_safetensors.py::test_save_format_without_a_value_is_refused"],
    "vae_path": ["tests/test_dit_paths.py::test_bad_vae_paths_one_line"],
    "val_data_dir": ["tests/test_surfaces.py::test_n4_n5_the_validation_folder_is_checked_at_the_start",
                     "tests/test_bad_input.py::"
                     "test_a_missing_val_data_dir_is_named_before_the_model_is_built"],
}


def _text_flags():
    found = {}
    for path, parser in PARSERS:
        for action in parser._actions:
            if _takes_a_value(action) and not _is_typed(action) and action.choices is None:
                found.setdefault(action.dest, []).append(path)
    return found


def _test_functions(file):
    with open(os.path.join(REPO, file)) as f:
        source = f.read()
    tree = ast.parse(source)
    return source, {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_text_flag_has_a_bad_input_test():
    flags = _text_flags()
    missing = sorted(f"--{name} ({', '.join(paths)})" for name, paths in flags.items()
                     if name not in TEXT_FLAG_TESTS)
    assert not missing, (
        "flags that read a path or a value without a bad-input test in TEXT_FLAG_TESTS "
        f"(tests/test_input_rules.py; docs/testing.md): {', '.join(missing)}")
    stale = sorted(set(TEXT_FLAG_TESTS) - set(flags))
    assert not stale, f"TEXT_FLAG_TESTS rows for flags no script has: {stale}"
    problems = []
    for name, tests in TEXT_FLAG_TESTS.items():
        if not tests:
            problems.append(f"--{name}: no test named")
        for test in tests:
            file, function = test.split("::")
            source, functions = _test_functions(file)
            if function not in functions:
                problems.append(f"--{name}: {test} does not exist")
            elif name not in source:
                problems.append(f"--{name}: {file} never mentions the flag")
    assert not problems, problems


# Bad input for the text flags no other test covered (positional arguments by their name).
BAD_TEXT_CASES = {
    "archive missing": ("datasets/cifar10.py", ["MISSING.tar.gz", "--out_dir", "OUT/c"],
                        "not found"),
    "archive a png": ("datasets/cifar10.py", ["PNG", "--out_dir", "OUT/c"], "not a tar archive"),
    "lmdb_path missing": ("datasets/lsun.py", ["MISSING", "--out_dir", "OUT/l"], "not found"),
    "lmdb_path an empty folder": ("datasets/lsun.py", ["EMPTY", "--out_dir", "OUT/l"],
                                  "not an lmdb"),
    "resample unknown": ("datasets/digits.py", ["--out_dir", "OUT/d", "--resample", "bogus"],
                         "--resample"),
    "budgets not numbers": ("experiments/solver_grids.py", ["--budgets", "a,b"], "error:"),
    "strengths not numbers": ("experiments/sdedit_digits.py", ["--strengths", "x"], "error:"),
    "classifier_scales not numbers": ("experiments/sdedit_digits.py",
                                      ["--classifier_scales", "x"], "error:"),
    "scales not numbers": ("experiments/guidance_sweep.py", ["--scales", "x"], "error:"),
    "ema_rate not numbers": ("scripts/image_train.py",
                             ["--data_dir", "IMAGES", *MODEL, "--ema_rate", "abc", "--log_dir",
                              "OUT/t"], "--ema_rate"),
    "schedule_sampler unknown": ("scripts/image_train.py",
                                 ["--data_dir", "IMAGES", *MODEL, "--schedule_sampler", "bogus",
                                  "--log_dir", "OUT/t"], "bogus"),
    "classifier_pool unknown": ("scripts/classifier_train.py",
                                ["--data_dir", "IMAGES", "--image_size", "8", "--classifier_width",
                                 "32", "--classifier_depth", "1", "--classifier_channel_mult",
                                 "1,2", "--classifier_attention_resolutions", "4", "--num_classes",
                                 "2", "--classifier_pool", "bogus", "--log_dir", "OUT/t"],
                                "bogus"),
    "features_npz missing": ("scripts/vae_latent_pca.py",
                             ["--features_npz", "MISSING.npz", "--out_dir", "OUT/p"],
                             "--features_npz"),
    "features_npz a png": ("scripts/vae_latent_pca.py",
                           ["--features_npz", "PNG", "--out_dir", "OUT/p"], "a PNG image"),
    "likelihood unknown": ("scripts/vae_train.py", ["--data_dir", "IMAGES", "--image_size", "8",
                                                    "--likelihood", "bogus", "--log_dir", "OUT/t"],
                           "--likelihood"),
    "prefix empty": ("datasets/lsun.py", ["EMPTY", "--out_dir", "OUT/l", "--prefix", ""],
                     "error:"),
    "out_npz not an npz": ("evaluations/make_ref_batch.py", ["IMAGES", "IMAGES", "--image_size",
                                                             "8"], ".npz"),
    "npz missing": ("scripts/npz_to_images.py", ["MISSING.npz"], "MISSING"),
    "npz a png": ("scripts/npz_to_images.py", ["PNG"], "a PNG image"),
    "samples missing": ("experiments/digits_report.py", ["MISSING.npz"], "MISSING"),
    "sample_path missing": ("scripts/cgan_eval.py", ["--sample_path", "MISSING.npz",
                                                     "--data_dir", "IMAGES"], "MISSING"),
    "test_dir missing": ("scripts/cgan_eval.py", ["--sample_path", "MISSING.npz", "--data_dir",
                                                  "IMAGES", "--test_dir", "MISSING"], "MISSING"),
    "steps not numbers": ("scripts/ddim_invert.py", ["--steps", "a,b", "--input", "IMAGES",
                                                     "--model_path", "MISSING.pt"], "error:"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT_CASES))
def test_text_flags_refuse_bad_input_in_one_line(case, tmp_path, capsys):
    from guided_diffusion.cli.main import run_main
    from test_surfaces import _module

    path, argv, words = BAD_TEXT_CASES[case]
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "OUT").mkdir()
    images = write_images(tmp_path / "IMAGES", count=4)
    names = {"EMPTY": str(tmp_path / "EMPTY"), "MISSING": str(tmp_path / "MISSING"),
             "IMAGES": images, "OUT": str(tmp_path / "OUT"),
             "PNG": os.path.join(images, "c0_0.png")}

    def expand(arg):
        for key, value in names.items():
            if arg == key or arg.startswith(key + "/") or arg.startswith(key + "."):
                return value + arg[len(key):]
        return arg
    module = _module(path)
    with pytest.raises(SystemExit) as stop:
        run_main(module.main, [expand(a) for a in argv])
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert "error" in err[-1] and "Traceback" not in "\n".join(err), err
    assert words.replace("MISSING", str(tmp_path / "MISSING")) in err[-1], err[-1]


# ----------------------------------------------------------------------------- rule 2: writers

# The calls that write a file: a function that makes one of them writes files.
WRITE_PRIMITIVES = ("atomic_write", "write_json", "save_atomic", "save_checkpoint_files",
                    "make_grid_png", "savez", "savez_compressed")
# Where the features live: the package and every script that ships (not experiments/ nor tests).
WRITER_PATTERNS = ("guided_diffusion/**/*.py", "scripts/*.py", "evaluations/*.py", "datasets/*.py")

# "file:function" -> its interruption test(s) (a signal or a kill, a full disk, a second job).
WRITING_FEATURES = {
    "guided_diffusion/runtime/files.py:write_json": [
        "tests/test_input_rules.py::test_a_write_that_fails_on_a_full_disk_leaves_the_old_file"],
    "guided_diffusion/runtime/checkpoints.py:save_atomic": [
        "tests/test_checkpoints.py::test_process_killed_mid_save_leaves_previous_file"],
    "guided_diffusion/runtime/checkpoints.py:save_checkpoint_files": [
        "tests/test_runs.py::test_a_run_killed_while_saving_loses_nothing_kept",
        "tests/test_resume.py::test_disk_full_during_a_save_keeps_the_previous_checkpoint"],
    "guided_diffusion/training/engine.py:save": [
        "tests/test_resume.py::test_preempted_then_resumed_run_equals_the_uninterrupted_one",
        "tests/test_resume.py::test_a_real_full_disk",
        "tests/test_faults.py::"
        "test_a_second_job_on_a_live_jobs_folder_is_refused_and_a_dead_job_leaves_no_lock"],
    "guided_diffusion/training/engine.py:_delete_set": [
        "tests/test_surfaces.py::test_n7_a_deletion_killed_half_way_is_finished_at_the_next_start"],
    "guided_diffusion/training/watch.py:__call__": [
        "tests/test_surfaces.py::test_n6_a_failing_grid_or_validation_never_costs_a_checkpoint",
        "tests/test_surfaces.py::test_n6_a_grid_cut_short_by_a_kill_is_removed_at_the_next_start"],
    "guided_diffusion/runtime/run_record.py:write_run_record": [
        "tests/test_input_rules.py::test_a_write_that_fails_on_a_full_disk_leaves_the_old_file"],
    "guided_diffusion/runtime/kept_rounds.py:_write_round": [
        "tests/test_resumable_sampling.py::"
        "test_sigterm_stops_after_the_batch_and_the_same_command_continues_byte_for_byte",
        "tests/test_resumable_sampling.py::test_a_full_disk_part_way_names_the_folder_and_what_is_kept",
        "tests/test_resumable_sampling.py::test_a_second_live_job_on_the_folder_is_refused"],
    "guided_diffusion/sampling/files.py:make_grid_png": [
        "tests/test_surfaces.py::test_n6_a_grid_cut_short_by_a_kill_is_removed_at_the_next_start"],
    "guided_diffusion/sampling/files.py:save_images_npz": [
        "tests/test_resumable_sampling.py::test_ddim_consistency_stopped_and_continued_gives_the_same_bytes",
        "tests/test_input_rules.py::test_a_write_that_fails_on_a_full_disk_leaves_the_old_file"],
    "guided_diffusion/sampling/files.py:save_samples": [
        "tests/test_resumable_sampling.py::test_a_full_disk_part_way_names_the_folder_and_what_is_kept"],
    "guided_diffusion/sampling/files.py:save_latents": [
        "tests/test_input_rules.py::test_a_write_that_fails_on_a_full_disk_leaves_the_old_file"],
    "guided_diffusion/sampling/editing.py:write_edits": [
        "tests/test_resumable_sampling.py::test_image_edit_stopped_and_continued_gives_the_same_files"],
    "guided_diffusion/evaluation/reference_batch.py:make_reference_batch": [
        "tests/test_input_rules.py::test_a_write_that_fails_on_a_full_disk_leaves_the_old_file"],
    "guided_diffusion/vae/pca.py:embedding_report": [
        "tests/test_input_rules.py::test_a_write_that_fails_on_a_full_disk_leaves_the_old_file"],
    "guided_diffusion/vae/sampling.py:save_reconstructions": [
        "tests/test_resumable_sampling.py::test_vae_sample_stopped_and_continued_gives_the_same_bytes"],
    "guided_diffusion/vae/sampling.py:save_interpolation": [
        "tests/test_resumable_sampling.py::test_vae_sample_stopped_and_continued_gives_the_same_bytes"],
    "scripts/ddim_consistency.py:main": [
        "tests/test_resumable_sampling.py::test_ddim_consistency_stopped_and_continued_gives_the_same_bytes"],
    "scripts/ddim_consistency.py:write": [
        "tests/test_resumable_sampling.py::test_ddim_consistency_stopped_and_continued_gives_the_same_bytes"],
    # The three DDIM tools share kept_pass_rounds and the atomic writers with ddim_consistency.
    "scripts/ddim_interpolate.py:main": [
        "tests/test_resumable_sampling.py::test_ddim_consistency_stopped_and_continued_gives_the_same_bytes"],
    "scripts/ddim_interpolate.py:write": [
        "tests/test_resumable_sampling.py::test_ddim_consistency_stopped_and_continued_gives_the_same_bytes"],
    "scripts/ddim_invert.py:main": [
        "tests/test_resumable_sampling.py::test_ddim_consistency_stopped_and_continued_gives_the_same_bytes"],
    "scripts/ddim_invert.py:write": [
        "tests/test_resumable_sampling.py::test_ddim_consistency_stopped_and_continued_gives_the_same_bytes"],
    "guided_diffusion/logger.py:_run_id": [
        "tests/test_input_rules.py::"
        "test_a_wandb_run_id_that_fails_on_a_full_disk_leaves_no_file_and_comes_next_time"],
    "scripts/image_nll.py:run_bpd_evaluation": [
        "tests/test_input_rules.py::test_a_write_that_fails_on_a_full_disk_leaves_the_old_file"],
}


def _writers():
    found = set()
    for pattern in WRITER_PATTERNS:
        for path in sorted(glob.glob(os.path.join(REPO, pattern), recursive=True)):
            with open(path) as f:
                tree = ast.parse(f.read())
            rel = os.path.relpath(path, REPO)
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for call in ast.walk(node):
                    if isinstance(call, ast.Call):
                        fn = call.func
                        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                        if name in WRITE_PRIMITIVES and node.name != name:
                            found.add(f"{rel}:{node.name}")
                            break
    return found


def test_every_file_writing_feature_has_an_interruption_test():
    writers = _writers()
    missing = sorted(writers - set(WRITING_FEATURES))
    assert not missing, (
        "functions that write files without an interruption test in WRITING_FEATURES "
        f"(tests/test_input_rules.py; docs/testing.md): {missing}")
    stale = sorted(set(WRITING_FEATURES) - writers)
    assert not stale, f"WRITING_FEATURES rows for functions that write no file (any more): {stale}"
    for feature, tests in WRITING_FEATURES.items():
        assert tests, feature
        for test in tests:
            file, function = test.split("::")
            assert function in _test_functions(file)[1], f"{feature}: {test} does not exist"


def test_the_enforcement_catches_a_new_flag_and_a_new_writer(tmp_path, monkeypatch):
    """The two tables are checked against the code, not against themselves."""
    global PARSERS
    parser = argparse.ArgumentParser()
    parser.add_argument("--brand_new_path")
    monkeypatch.setattr(sys.modules[__name__], "PARSERS", [*PARSERS, ("scripts/new.py", parser)])
    with pytest.raises(AssertionError, match="brand_new_path"):
        test_every_text_flag_has_a_bad_input_test()
    monkeypatch.setattr(sys.modules[__name__], "WRITING_FEATURES",
                        {k: v for k, v in WRITING_FEATURES.items()
                         if not k.endswith(":write_run_record")})
    with pytest.raises(AssertionError, match="write_run_record"):
        test_every_file_writing_feature_has_an_interruption_test()


# ----------------------------------------------------------------------------- full disk


def _full_disk_cases(tmp_path):
    """feature -> (the file it writes, a call that writes it)."""
    import torch

    from guided_diffusion.evaluation.reference_batch import make_reference_batch
    from guided_diffusion.runtime.files import write_json
    from guided_diffusion.runtime.run_record import describe_run, write_run_record
    from guided_diffusion.sampling.files import save_images_npz, save_latents
    from guided_diffusion.vae.pca import embedding_report

    images = write_images(tmp_path / "images", count=4)
    out = str(tmp_path / "out")
    os.makedirs(out)
    features = np.random.RandomState(0).randn(20, 4)
    return {
        "write_json": (os.path.join(out, "x.json"),
                       lambda: write_json(os.path.join(out, "x.json"), {"a": 1})),
        "write_run_record": (os.path.join(out, "args.json"),
                             lambda: write_run_record(out, describe_run({"a": 1}, "image_train.py", []))),
        "make_reference_batch": (os.path.join(out, "ref.npz"),
                                 lambda: make_reference_batch(images, os.path.join(out, "ref.npz"), 8)),
        "save_images_npz": (os.path.join(out, "s.npz"),
                            lambda: save_images_npz(os.path.join(out, "s.npz"),
                                                    np.zeros((2, 8, 8, 3), np.uint8), None)),
        "save_latents": (os.path.join(out, "latents.npz"),
                         lambda: save_latents(os.path.join(out, "latents.npz"),
                                              torch.zeros(2, 3, 8, 8), labels=None, steps=10)),
        "embedding_report": (os.path.join(out, "pca", "embedding.npz"),
                             lambda: embedding_report(features, os.path.join(out, "pca"))),
    }


@pytest.mark.parametrize("feature", ["write_json", "write_run_record", "make_reference_batch",
                                     "save_images_npz", "save_latents", "embedding_report"])
def test_a_write_that_fails_on_a_full_disk_leaves_the_old_file(feature, tmp_path, monkeypatch):
    """The disk fills while the file is written (fsync fails): the earlier file is intact and
    no temporary file is left. image_nll.py's terms go through the same atomic_write."""
    from guided_diffusion.runtime import files

    path, write = _full_disk_cases(tmp_path)[feature]
    try:
        write()
    except TypeError:
        pytest.skip(f"{feature}: call signature changed")
    if not os.path.exists(path):
        candidates = glob.glob(os.path.join(os.path.dirname(path), "*.npz"))
        path = candidates[0]
    before = open(path, "rb").read()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError) as error:
        write()
    assert error.value.errno == errno.ENOSPC
    assert open(path, "rb").read() == before
    folder = os.path.dirname(path)
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_a_wandb_run_id_that_fails_on_a_full_disk_leaves_no_file_and_comes_next_time(
        tmp_path, monkeypatch):
    """The id file of a W&B run (logger.WandbOutputFormat._run_id): a full disk while it is
    written leaves neither an empty id file (which a resume would trip over) nor a temporary;
    the next start writes it."""
    from guided_diffusion import logger
    from guided_diffusion.runtime import files

    real_fsync = files.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError):
        logger.WandbOutputFormat._run_id(str(tmp_path))
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    first = logger.WandbOutputFormat._run_id(str(tmp_path))
    assert first and logger.WandbOutputFormat._run_id(str(tmp_path)) == first
