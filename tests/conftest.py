"Fixtures shared by the training tests: a tiny image folder and one tiny MAE encoder."
import pytest
from drifting_nb.train import get_config
from drifting_nb.data import make_fake_imagefolder

@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    make_fake_imagefolder(root / "train", num_classes=3, per_class=12, size=(24, 20))
    return root

@pytest.fixture(scope="session")
def encoder(tmp_path_factory, folder):
    "One tiny MAE encoder shared by the tests that are not about pretraining (--encoder-path)."
    from drifting_nb.train_mae import make_config, train_mae
    cfg = get_config("tiny-pixel")
    path = tmp_path_factory.mktemp("enc")
    train_mae(make_config(cfg.mae_preset, dict(cfg.mae_overrides)), path, data_dir=str(folder), progress=False)
    return str(path)
