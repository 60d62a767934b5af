from npeff_lens.cli import main


def test_help_and_listings(capsys):
    assert main([]) == 0
    assert "models" in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "bridge" in out
    assert main(["datasets"]) == 0
    assert "movie-reviews" in capsys.readouterr().out


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["zero-shot", "--model", "nope", "--n", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smollm2-135m" in err[0]
