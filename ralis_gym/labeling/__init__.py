"""The labeling loop for annotation teams: suggest regions, annotate them in Label Studio or CVAT,
import the results, retrain, repeat (``ralis-gym label ...``; :class:`LabelingProject` for notebooks).

``project`` holds a project's state (one SQLite database per project folder) and the loop's steps;
``formats`` reads and writes the annotation tools' files (Label Studio JSON, CVAT XML, PNG masks).
"""

from ralis_gym.labeling.project import LabelingProject, ProjectError

__all__ = ["LabelingProject", "ProjectError"]
