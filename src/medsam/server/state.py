"""``Workbench``: the state one server instance owns, handed to routes as a typed dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from .active_learning import UncertaintyStore
from .datastore import Datastore, ImageNotFound, LoadedImage
from .engine import SegmentationEngine
from .jobs import JobManager
from .labels import LabelStore
from .monailabel_sessions import SessionStore
from .native3d_engine import Native3DEngine
from .security import UnsafePathError
from .settings import ServerSettings
from .training_job import TrainingManager

__all__ = ["Workbench", "WorkbenchDep", "get_workbench"]


@dataclass
class Workbench:
    settings: ServerSettings
    datastore: Datastore
    labels: LabelStore
    engine: SegmentationEngine
    jobs: JobManager
    uncertainty: UncertaintyStore
    training: TrainingManager
    sessions: SessionStore
    native3d: Native3DEngine | None = None  # SAM-Med3D for /segment3d (--model3d)

    def load(self, image_id: str) -> LoadedImage:
        """Read an image for a route: 404 for unknown ids, 400 for unsafe ones, 422 unreadable."""
        try:
            return self.datastore.load(image_id)
        except UnsafePathError as exc:
            raise HTTPException(400, f"refused image id: {exc}") from None
        except (ImageNotFound, FileNotFoundError):
            raise HTTPException(404, f"no image {image_id!r}") from None
        except ValueError as exc:  # ImageReadError and normalisation failures
            raise HTTPException(422, f"cannot read {image_id!r}: {str(exc).splitlines()[0]}") from None

    def load_slice(self, image_id: str, index: int, status: int = 404) -> LoadedImage:
        """:meth:`load`, with slice ``index`` checked: ``status`` where the image has no such
        slice (404 where the index is part of the URL, 422 where it is a field of the body)."""
        loaded = self.load(image_id)
        try:
            loaded.check_slice(index)
        except IndexError as exc:
            raise HTTPException(status, str(exc)) from None
        return loaded

    def check_id(self, image_id: str) -> None:
        """400/404 for ids that are unsafe or not images, without reading the image."""
        try:
            self.datastore.path_of(image_id)
        except UnsafePathError as exc:
            raise HTTPException(400, f"refused image id: {exc}") from None
        except ImageNotFound:
            raise HTTPException(404, f"no image {image_id!r}") from None


def get_workbench(request: Request) -> Workbench:
    """The app's workbench, serving the model the state database records as served (another
    server process may have switched it)."""
    wb: Workbench = request.app.state.workbench
    wb.training.sync_served()
    return wb


WorkbenchDep = Annotated[Workbench, Depends(get_workbench)]
